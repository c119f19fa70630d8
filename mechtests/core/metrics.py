"""Metrics on the logits at the read position, and the statistics claims assert on.

A metric maps logits ``(..., n_prompts, d_vocab)`` to ``(..., n_prompts)``: leading dims are
patches, so one metric serves a single run and a batched sweep. ``estimate`` turns per-prompt
values into a mean with a standard error and a seeded bootstrap confidence interval, so a claim
can assert on the interval's lower bound rather than on a mean alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Metric = Callable[[torch.Tensor], torch.Tensor]


class MetricError(ArithmeticError):
    """A metric came out NaN or infinite (the message names the prompt)."""


def _pick(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    ids = ids.to(logits.device).expand(*logits.shape[:-1])
    return logits.gather(-1, ids[..., None])[..., 0]


@dataclass(frozen=True, eq=False)
class ColumnMetric:
    """A metric that reads only the logits of some token ids (``reads``: ``[k]`` for every
    prompt, or ``[n_prompts, k]``), so the engine can compute just those columns: exact, as
    each logit is one dot product. ``on_columns`` maps those logits ``(..., n_prompts, k)`` to
    ``(..., n_prompts)``; calling it on full logits picks the columns first."""

    reads: torch.Tensor
    on_columns: Callable[[torch.Tensor], torch.Tensor]

    def columns(self, logits: torch.Tensor) -> torch.Tensor:
        ids = self.reads.to(logits.device)
        return logits.gather(-1, ids.expand(*logits.shape[:-1], ids.shape[-1]))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.on_columns(self.columns(logits))


def logit_diff(answer_ids: torch.Tensor, counterfactual_ids: torch.Tensor) -> ColumnMetric:
    """logit(answer) - logit(counterfactual), per prompt (the IOI paper's metric). It reads
    two columns per prompt. (Probabilities, log-probabilities, KL and entropy need the whole
    row for their normaliser, so they declare nothing.)"""
    a, c = torch.as_tensor(answer_ids), torch.as_tensor(counterfactual_ids)
    a, c = torch.broadcast_tensors(a.long(), c.long())
    return ColumnMetric(torch.stack([a, c], -1), lambda cols: cols[..., 0] - cols[..., 1])


def logprob(answer_ids: torch.Tensor) -> Metric:
    """log P(answer), per prompt."""
    return lambda logits: _pick(logits.float().log_softmax(-1), answer_ids)


def prob(answer_ids: torch.Tensor) -> Metric:
    """P(answer), per prompt."""
    return lambda logits: _pick(logits.float().softmax(-1), answer_ids)


def kl_to(clean_logits: torch.Tensor) -> Metric:
    """KL(clean || run) of the next-token distributions, per prompt (0 means 'like clean')."""
    p_log = clean_logits.float().log_softmax(-1)

    def kl(logits: torch.Tensor) -> torch.Tensor:
        q_log = logits.float().log_softmax(-1)
        return (p_log.exp() * (p_log - q_log)).sum(-1)

    return kl


def entropy() -> Metric:
    """Entropy of the next-token distribution (nats), per prompt."""

    def h(logits: torch.Tensor) -> torch.Tensor:
        lp = logits.float().log_softmax(-1)
        return -(lp.exp() * lp).sum(-1)

    return h


def restoration(patched: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor
                ) -> torch.Tensor:
    """(patched - corrupted) / (clean - corrupted): 0 is no restoration, 1 is full."""
    denom = clean - corrupted
    if torch.as_tensor(denom).abs().min() < 1e-9:
        raise MetricError(
            "normalised restoration is undefined: the clean and corrupted metrics are equal, so "
            "the corruption changes nothing to restore; choose a corruption that moves the metric"
        )
    return (patched - corrupted) / denom


@dataclass(frozen=True, eq=False)
class Estimate:
    """Per-prompt values and their summary: mean, standard error, bootstrap CI."""

    per_prompt: torch.Tensor
    mean: float
    sem: float
    ci_low: float
    ci_high: float
    level: float

    @property
    def n(self) -> int:
        return self.per_prompt.numel()

    def __str__(self) -> str:
        pct = round(self.level * 100)
        return (f"{self.mean:.4g} ± {self.sem:.2g} (n={self.n}, {pct}% CI "
                f"[{self.ci_low:.4g}, {self.ci_high:.4g}])")


def check_finite(values: torch.Tensor, prompts: Sequence[str] | None = None,
                 what: str = "metric") -> None:
    """Raise ``MetricError`` naming the first prompt whose value is NaN or infinite."""
    bad = ~torch.isfinite(values)
    if bad.any():
        flat = bad.reshape(-1, bad.shape[-1]) if bad.dim() else bad.reshape(1, 1)
        i = int(flat.any(0).nonzero()[0])
        name = f"prompt {i}" + (f" ({prompts[i]!r})" if prompts and i < len(prompts) else "")
        val = values.reshape(-1, values.shape[-1])[:, i] if values.dim() else values
        raise MetricError(
            f"{what} is {val[~torch.isfinite(val)][0].item()} for {name}; check the answer "
            f"tokens and the model's logits for that prompt"
        )


def estimate(values: torch.Tensor, prompts: Sequence[str] | None = None, level: float = 0.95,
             n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean, standard error and a percentile bootstrap CI of per-prompt ``values``."""
    values = values.detach().double().cpu().flatten()
    check_finite(values, prompts)
    n = values.numel()
    if n == 0:
        raise MetricError("no values to summarise: the family has no prompts")
    mean = float(values.mean())
    sem = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    if n > 1:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (n_boot, n), generator=g)
        means = values[idx].mean(1)
        alpha = (1 - level) / 2
        lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=means.dtype))
        ci = (float(lo), float(hi))
    else:
        ci = (mean, mean)
    return Estimate(values.float(), mean, sem, ci[0], ci[1], level)


def evaluate(metric: Metric, logits: torch.Tensor, prompts: Sequence[str] | None = None
             ) -> Estimate:
    """Apply ``metric`` to logits at the read position ``(n_prompts, d_vocab)``, summarised."""
    values = metric(logits)
    if values.shape != logits.shape[:-1]:
        raise MetricError(
            f"the metric returned shape {tuple(values.shape)}; it must return one value per "
            f"prompt, shape {tuple(logits.shape[:-1])}"
        )
    return estimate(values, prompts)
