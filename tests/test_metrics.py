"""Metrics and the statistics claims assert on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechtests.core import metrics as M


def test_logit_diff_broadcasts_over_patches():
    logits = torch.randn(5, 3, 10)  # 5 patches, 3 prompts
    ans, cf = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    ld = M.logit_diff(ans, cf)(logits)
    assert ld.shape == (5, 3)
    assert torch.allclose(ld[2, 1], logits[2, 1, 2] - logits[2, 1, 5])


def test_prob_logprob_kl_entropy():
    logits = torch.randn(4, 7)
    ans = torch.tensor([0, 1, 2, 3])
    assert torch.allclose(M.prob(ans)(logits).log(), M.logprob(ans)(logits), atol=1e-6)
    assert torch.allclose(M.kl_to(logits)(logits), torch.zeros(4), atol=1e-6)
    assert (M.kl_to(logits)(torch.randn(4, 7)) > 0).all()
    uniform = torch.zeros(4, 7)
    assert torch.allclose(M.entropy()(uniform), torch.full((4,), torch.log(torch.tensor(7.0))))


def test_restoration_bounds_and_error():
    clean, corr = torch.tensor([3.0, 2.0]), torch.tensor([-3.0, -1.0])
    assert torch.allclose(M.restoration(corr, clean, corr), torch.zeros(2))
    assert torch.allclose(M.restoration(clean, clean, corr), torch.ones(2))
    with pytest.raises(M.MetricError, match="clean and corrupted metrics are equal"):
        M.restoration(clean, clean, clean)


def test_estimate_ci_is_seeded_and_brackets_mean():
    v = torch.arange(20.0)
    a, b = M.estimate(v), M.estimate(v)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert a.ci_low < a.mean < a.ci_high
    assert a.mean == pytest.approx(9.5)
    assert a.sem == pytest.approx(v.std().item() / 20**0.5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=2, max_size=40))
def test_estimate_ci_within_range(xs):
    e = M.estimate(torch.tensor(xs, dtype=torch.float64))
    assert min(xs) - 1e-6 <= e.ci_low <= e.ci_high <= max(xs) + 1e-6


def test_nan_names_prompt():
    with pytest.raises(M.MetricError, match=r"nan for prompt 1 \('b'\)"):
        M.estimate(torch.tensor([1.0, float("nan"), 2.0]), prompts=["a", "b", "c"])
    with pytest.raises(M.MetricError, match=r"inf for prompt 2"):
        M.estimate(torch.tensor([1.0, 2.0, float("inf")]))


def test_evaluate_checks_metric_shape():
    with pytest.raises(M.MetricError, match=r"one value per prompt, shape \(3,\)"):
        M.evaluate(lambda lg: lg.sum(), torch.randn(3, 5))
