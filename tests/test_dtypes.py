"""Half precision runs, checked at the dtype's tolerance (``engine.VERIFY_RTOL``).

bfloat16 keeps 8 mantissa bits and float16 11, so a forward in them differs from float32 by a
few units of the dtype's epsilon per layer: the engine is compared with float32 at a tolerance
relative to the logits' scale, and README states what a user can expect.
"""

from __future__ import annotations

import pytest
import torch

from mechtests.analysis import patching
from mechtests.analysis.attribution import neuron_ablation_effect
from mechtests.core.engine import VERIFY_RTOL, Engine
from mechtests.core.models import load_model
from mechtests.testing import save_arch_checkpoint


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def path(request, tmp_path_factory):
    return save_arch_checkpoint(tmp_path_factory.mktemp(request.param) / "m", request.param)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engine_agrees_with_float32(path, dtype):
    half = Engine(load_model(str(path), device="cpu", dtype=dtype))
    full = Engine(load_model(str(path), device="cpu"))
    assert half.dtype == getattr(torch, dtype)
    assert half.verified["hf_max_err"] <= half.verified["tolerance"]
    tokens = torch.randint(1, full.d_vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    lf, _ = full.run(tokens)
    lh, _ = half.run(tokens)
    c = lambda x: x.float() - x.float().mean(-1, keepdim=True)  # noqa: E731
    scale = max(1.0, lf.abs().max().item())
    err = (c(lh) - c(lf)).abs().max().item() / scale
    assert err < VERIFY_RTOL[half.dtype], err
    assert err > 0  # it really ran in half precision

    clean, corrupted = tokens, tokens.clone()
    corrupted[:, 3] = (tokens[:, 3] + 5) % full.d_vocab
    metric = lambda lg: lg[..., 3].float() - lg[..., 5].float()  # noqa: E731
    a = patching.sweep(full, "z", clean, corrupted, metric).per_prompt
    b = patching.sweep(half, "z", clean, corrupted, metric).per_prompt
    assert (a - b).abs().max() < 2 * VERIFY_RTOL[half.dtype] * max(1.0, a.abs().max().item())


def test_neuron_ablation_runs_in_bfloat16(path):
    """It used to build a float32 mask and crash in a bfloat16 forward."""
    tokens = torch.randint(1, 30, (2, 6), generator=torch.Generator().manual_seed(1))
    full = neuron_ablation_effect(load_model(str(path), device="cpu"), tokens, 0, [0, 1, 2])
    half = neuron_ablation_effect(load_model(str(path), device="cpu", dtype="bfloat16"),
                                  tokens, 0, [0, 1, 2], how="mean")
    again = neuron_ablation_effect(load_model(str(path), device="cpu", dtype="bfloat16"),
                                   tokens, 0, [0, 1, 2])
    assert half.values.shape == full.values.shape
    scale = max(1.0, full.values.abs().max().item())
    assert (again.values.float() - full.values).abs().max() < 2 * VERIFY_RTOL[torch.bfloat16] \
        * scale
