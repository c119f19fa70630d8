"""What the analysis views share: tokens in, one read position per prompt, one engine forward.

Private to ``mechtests.analysis``: the views (attribution, heads) call these; users call the views.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Tokens = torch.Tensor | str | Sequence[str]
Pos = int | torch.Tensor | Sequence[int] | None
Edit = Callable[[torch.Tensor], torch.Tensor]


# -- plumbing: every forward goes through _run / _run_edited ----------------------------------
def _engine(model: Any) -> Any:
    """The model's cached ``Engine``; None only for a GPT-2-style model outside compatibility
    mode, which runs through the bridge's own (TransformerLens) hooks.

    An architecture the engine cannot run exactly raises ``UnsupportedArchitecture`` (a
    ``NotImplementedError``) naming what the model has: never a fallback to hooks whose
    numbers the suite has not checked.
    """
    from mechtests.core.engine import Engine, EngineMismatch, engine_for

    if isinstance(model, Engine):
        return model
    try:
        return engine_for(model)
    except EngineMismatch:
        if getattr(model, "compatibility_mode", False):
            raise
        return None


def _w(model: Any, name: str) -> torch.Tensor:
    """A weight as the engine runs it (norm weights folded in): the numbers the views use are
    the ones the engine verified against the Hugging Face model. ``W_O`` / ``W_out`` are
    refused by the engine where a norm follows attention / the MLP (they are not writes
    there)."""
    eng = _engine(model)
    return getattr(eng if eng is not None else model, name).detach()


def _run(model: Any, tokens: torch.Tensor, sites: Sequence[str],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [n, T, V] and activations at ``sites`` (TL hook names, TL shapes), one forward.

    Interventions go through the patching core (``mechtests.analysis.patching``), never here.
    """
    eng = _engine(model)
    with torch.no_grad():
        if eng is not None:
            logits, acts = eng.run(tokens, sites)
            return logits, {s: acts[s] for s in sites}
        want = set(sites)
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in want)
    missing = want - set(cache.keys())
    if missing:
        raise KeyError(f"hook sites {sorted(missing)} were not recorded; check the names "
                       f"(e.g. 'blocks.0.hook_resid_pre', 'blocks.0.attn.hook_pattern')")
    return logits.detach(), {s: cache[s].detach() for s in sites}


def _tokens(model: Any, tokens: Tokens) -> torch.Tensor:
    """A [n_prompts, T] LongTensor on the model's device (strings go through ``to_tokens``)."""
    if isinstance(tokens, str) or (isinstance(tokens, Sequence) and tokens
                                   and isinstance(tokens[0], str)):
        tokens = model.to_tokens(tokens)
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must have shape [n_prompts, T] with T > 0, got "
                         f"{tuple(tokens.shape)}")
    return tokens.long().to(model.cfg.device)


def _positions(pos: Pos, tokens: torch.Tensor, what: str = "pos") -> torch.Tensor:
    """One read position per prompt ([n] LongTensor, non-negative); None means the last token."""
    n, t = tokens.shape
    if pos is None:
        pos = -1
    p = torch.as_tensor(pos, dtype=torch.long).flatten().to(tokens.device)
    if p.numel() == 1:
        p = p.expand(n)
    if p.numel() != n:
        raise ValueError(f"{what}: got {p.numel()} positions for {n} prompts; give one per prompt "
                         f"or a single int")
    bad = (p >= t) | (p < -t)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{what}: position {int(p[i])} of prompt {i} is beyond the prompt "
                         f"length {t}; positions run 0..{t - 1} (or -{t}..-1 from the end)")
    return torch.where(p < 0, p + t, p)


def _at(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x[b, pos[b], ...] for every prompt b."""
    return x[torch.arange(x.shape[0], device=x.device), pos.to(x.device)]


def _check_layer(model: Any, layer: int, upto: int | None = None) -> int:
    n = model.cfg.n_layers if upto is None else upto
    if not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"unknown layer {layer!r}: the model has layers 0..{n - 1}")
    return layer % n


def _check_head(model: Any, head: int) -> int:
    h = model.cfg.n_heads
    if not isinstance(head, int) or not 0 <= head < h:
        raise ValueError(f"unknown head {head!r}: each layer has heads 0..{h - 1}")
    return head


def _labels(n: int) -> list[str]:
    return [str(i) for i in range(n)]
