"""Induction heads (Olsson et al. 2022, "In-context learning and induction heads").

On a random token sequence repeated twice, induction heads attend from each second-half token to
the token right after that token's earlier copy, and a previous-token head in an earlier layer
makes this possible. Knocking the induction heads out raises the loss on the repeated half.

GPT-2 small (TransformerLens Exploratory Analysis Demo, seed 0, 50 random tokens from
[100, 20000) repeated, batch 2, no BOS): induction scores 5.1 .931, 5.5 .926, 6.9 .926,
7.10 .904, 7.2 .851, next highest about .48; previous-token score 4.11 .992. An unseeded rerun
gave .861-.932 for the same five, so the claim asserts membership and a floor of 0.8, not the
exact values. The organisms' heads are those their own analysis found (FINDINGS.md beside each).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mechtests.claims import holds, holds_set, reference
from mechtests.engine import engine_for
from mechtests.heads import head_scores, repeated_random_tokens


@dataclass(frozen=True)
class Induction:
    induction_heads: tuple[str, ...]
    previous_token_heads: tuple[str, ...]
    n_tokens: int  # length of the random segment (the sequence is twice that)
    vocab_range: tuple[int, int]
    bos: bool


REFS = {
    "gpt2": Induction(("5.1", "5.5", "6.9", "7.2", "7.10"), ("4.11",), 50, (100, 20000), False),
    "induction": Induction(("1.2",), ("0.1",), 10, (2, 200), True),
    "multitask": Induction(("2.0",), ("1.0",), 10, (2, 200), True),
}
MIN_INDUCTION = 0.8  # GPT-2's five clear it in both published runs; the next head is at .48
MIN_PREVIOUS = 0.8  # 4.11 scores .992; the next is .53
SOURCE = "Olsson et al. 2022; TransformerLens Exploratory Analysis Demo"
SUBJECTS = list(REFS)


def repeated_tokens(subject, ref: Induction, seed: int) -> torch.Tensor:
    bos = subject.model.tokenizer.bos_token_id if ref.bos else None
    return repeated_random_tokens(ref.n_tokens, batch=4, seed=seed, vocab_range=ref.vocab_range,
                                  bos=bos)


@pytest.mark.claim(id="induction.heads", source=SOURCE, subjects=SUBJECTS)
def test_induction_heads_attend_to_the_token_after_the_earlier_copy(subject, record,
                                                                    pin):
    _, ref = reference(subject, REFS)
    scores = head_scores(subject.model, repeated_tokens(subject, ref, seed=0), "induction",
                         over="targets")
    record.heatmap(scores, title="induction score")
    top = [h for h, _ in scores.top_k(len(ref.induction_heads))]
    holds_set(top, ref.induction_heads, "heads with the highest induction scores",
              "the published induction heads are the top ones", record)
    for head in ref.induction_heads:
        layer, h = head.split(".")
        holds(scores.at(layer=int(layer), head=int(h)), ">=", MIN_INDUCTION,
              f"induction score of {head}", "floor of both published GPT-2 runs", record)
    pin(scores, "induction_scores")


@pytest.mark.claim(id="induction.previous_token", source=SOURCE, subjects=SUBJECTS)
def test_a_previous_token_head_feeds_them(subject, record, pin):
    _, ref = reference(subject, REFS)
    scores = head_scores(subject.model, repeated_tokens(subject, ref, seed=0), "previous_token",
                         over="targets")
    record.heatmap(scores, title="previous-token score")
    layers = [int(h.split(".")[0]) for h in ref.induction_heads]
    for head in ref.previous_token_heads:
        layer, h = (int(x) for x in head.split("."))
        assert layer < min(layers), f"previous-token head {head} must sit before {layers}"
        holds(scores.at(layer=layer, head=h), ">=", MIN_PREVIOUS,
              f"previous-token score of {head}", "4.11 scores .992 in GPT-2", record)
    pin(scores, "previous_token_scores")


def repeat_loss(model, tokens: torch.Tensor, n_tokens: int, heads: tuple[str, ...] = ()
                ) -> torch.Tensor:
    """Mean next-token loss over the second copy, with ``heads`` zero-ablated (their z)."""
    engine = engine_for(model)
    by_layer: dict[int, list[int]] = {}
    for head in heads:
        layer, h = (int(x) for x in head.split("."))
        by_layer.setdefault(layer, []).append(h)

    def zero(hs: list[int]):
        def edit(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            z[:, :, hs] = 0
            return z
        return edit

    edits = {f"blocks.{layer}.attn.hook_z": zero(hs) for layer, hs in by_layer.items()}
    with torch.no_grad():
        logits, _ = engine.run(tokens, edits=edits)
    lp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return -lp[:, -(n_tokens - 1):].mean(1)  # predictions of the second copy's tokens 2..n


@pytest.mark.claim(id="induction.ablation", source=SOURCE, subjects=SUBJECTS)
def test_knocking_out_induction_heads_raises_repeat_loss(subject, record):
    _, ref = reference(subject, REFS)
    tokens = repeated_tokens(subject, ref, seed=1)
    before = repeat_loss(subject.model, tokens, ref.n_tokens)
    after = repeat_loss(subject.model, tokens, ref.n_tokens, ref.induction_heads)
    # The repeated half is nearly free to predict with induction (GPT-2: ~0.18 nats against
    # ~12 for the first half); without it, it is a random token again. Doubling the loss plus
    # one nat is far below that gap and far above run-to-run noise.
    holds(float(after.mean()), ">=", 2 * float(before.mean()) + 1.0,
          "repeat-half loss with the induction heads knocked out", "at least 2x + 1 nat",
          record, before=float(before.mean()), heads=list(ref.induction_heads))


@pytest.mark.claim(id="induction.exists", source=SOURCE, subjects=SUBJECTS)
def test_some_head_does_induction(subject, record):
    """A mechanism claim, not a head index: any checkpoint, any seed."""
    model = subject.model
    vocab = (max(model.tokenizer.all_special_ids, default=-1) + 1,
             min(model.cfg.d_vocab, 20000))
    n = min(10, (model.cfg.n_ctx - 1) // 2)
    tokens = repeated_random_tokens(n, batch=4, seed=0, vocab_range=vocab,
                                    bos=model.tokenizer.bos_token_id)
    scores = head_scores(model, tokens, "induction", over="targets")
    best, value = scores.top_k(1)[0]
    holds(value, ">=", MIN_INDUCTION, f"best induction score (head {best})",
          "an induction head puts most of its attention on the token after the earlier copy",
          record)
