"""Norm-based attention (Kobayashi et al. 2020) as a head view: ||alpha_ij f(x_j)||."""

from __future__ import annotations

import pytest
import torch

from mechtests.analysis.heads import attention_between, attention_pattern, head_scores


def _tokens(n: int = 3, T: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, 30, (n, T), generator=g)


def test_norm_view_is_attention_times_the_moved_vectors_norm(tiny_model):
    """Checked through TransformerLens's own forward (the bridge's hooks, not the engine):
    pattern_ij * ||v_j W_O||, and the head's output z_i W_O = sum_j alpha_ij v_j W_O, so its
    norm is at most the row's sum (triangle inequality)."""
    toks = _tokens()
    m = tiny_model
    names = {"blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v", "blocks.1.attn.hook_z"}
    with torch.no_grad():
        _, cache = m.run_with_cache(toks, names_filter=lambda n: n in names)
    W_O = m.blocks[1].attn.W_O  # [H, d_head, d_model]
    for head in range(m.cfg.n_heads):
        fx = cache["blocks.1.attn.hook_v"][0, :, head] @ W_O[head]  # [src, d_model]
        expect = cache["blocks.1.attn.hook_pattern"][0, head] * fx.norm(dim=-1)[None]
        got = attention_pattern(m, toks, 1, head, weighting="norm").values
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)
        out = (cache["blocks.1.attn.hook_z"][0, :, head] @ W_O[head]).norm(dim=-1)
        assert (out <= got.sum(-1) + 1e-5).all()


def test_norm_shares_between_positions_sum_to_one_over_sources(tiny_model):
    """``attention_between(..., weighting="norm")`` is a share of what the head moves: over
    every source position of one destination it sums to 1, as the raw pattern does."""
    m = tiny_model
    toks = _tokens(2)
    for weighting in ("attention", "norm"):
        total = sum(attention_between(m, toks, 8, k, weighting=weighting).values
                    for k in range(9))
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_norm_head_scores_and_bad_weighting(tiny_model):
    toks = torch.cat([_tokens(2, 6), _tokens(2, 6)], 1)
    raw = head_scores(tiny_model, toks, "induction", over="targets")
    norm = head_scores(tiny_model, toks, "induction", over="targets", weighting="norm")
    assert norm.meta["weighting"] == "norm" and raw.meta["weighting"] == "attention"
    assert ((norm.values >= 0) & (norm.values <= 1 + 1e-6)).all()
    assert not torch.allclose(norm.values, raw.values)
    with pytest.raises(ValueError, match="weighting='value'.*Kobayashi"):
        attention_pattern(tiny_model, toks, 0, 0, weighting="value")
