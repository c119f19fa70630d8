"""Benchmark cases shared by the timing benchmarks and the peak-memory script.

Each task runs the same cells in both implementations: this engine (``mechtests``) and
TransformerLens (``transformer_lens``), both starting from tokens (TL's clean cache is part of
its timed call, as the engine's clean run is part of its own) and both under ``no_grad``.
"""

from __future__ import annotations

import itertools

import pandas as pd
import torch

from mechtests.testing import compare_attribution_with_tl

CASES = {"T11xN1": (11, 1), "T11xN8": (11, 8), "T64xN1": (64, 1), "T64xN8": (64, 8)}
TASKS = ("resid_pre", "head_out", "attribution")


def prompts(T: int, N: int, vocab: int = 50257, seed: int = 0):
    """Random prompts; each corrupted prompt differs from its clean one at position 1 (as in
    "Michelle Jones/Smith ..."): the engine skips patches before the first differing position
    (their activations are identical), so an early difference is its least favourable case."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (N, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = (clean[:, 1] + 1 + torch.arange(N)) % vocab
    return clean, corrupted


def metric(logits: torch.Tensor) -> torch.Tensor:
    """A logit difference between two fixed tokens (TL's attribution_patch needs one metric for
    every prompt)."""
    return logits[..., 11] - logits[..., 12]


def cells(task: str, case: str, full: bool) -> dict | None:
    """The swept cells: None = the full sweep. ``full=False`` (CI's --benchmark-disable run)
    shrinks every case so the agreement checks stay quick (tests/ check full sweeps)."""
    T, N = CASES[case]
    if full and T == 11:
        return None
    a = T // 3
    if case == "T11xN1":  # first and last layer, every position / head
        return {"layers": [0, 11], **({"positions": list(range(T))} if task == "resid_pre"
                                      else {"heads": list(range(12))})}
    if task == "resid_pre":
        if full:
            return {"layers": list(range(12)) if N == 1 else [0, 3, 6, 9, 11],
                    "positions": [a, (a + T) // 2, T - 1]}
        return {"layers": [0, 11], "positions": [a, T - 1]}
    if full:
        return {"layers": [0, 4, 8, 11] if N == 1 else [0, 11], "heads": list(range(12))}
    return {"layers": [0, 11], "heads": [0, 7]}


def run_ours(engine, task: str, clean, corrupted, sub: dict | None):
    from mechtests.analysis import patching as P

    if task == "attribution":
        return P.attribution_patches(engine, [("z", ("layer", "head", "pos")), "mlp_out",
                                              "resid_pre"], clean, corrupted, metric)
    site = "resid_pre" if task == "resid_pre" else "z"
    return P.sweep(engine, site, clean, corrupted, metric, **(sub or {}))


def run_tl(model, task: str, clean, corrupted, sub: dict | None):
    import transformer_lens.patching as tlp

    if task == "attribution":
        from transformer_lens.tools.analysis import attribution_patch

        return attribution_patch(model, clean, corrupted, lambda lg: metric(lg[0, -1]))
    T = clean.shape[1]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        if task == "resid_pre":
            axes, setter, act = ("layer", "pos"), tlp.layer_pos_patch_setter, "resid_pre"
            ranges = (sub or {}).get("layers", range(12)), (sub or {}).get("positions", range(T))
        else:
            axes, setter, act = ("layer", "head"), tlp.layer_head_vector_patch_setter, "z"
            ranges = (sub or {}).get("layers", range(12)), (sub or {}).get("heads", range(12))
        df = pd.DataFrame(list(itertools.product(*ranges)), columns=list(axes))
        out = tlp.generic_activation_patch(model, corrupted, clean_cache,
                                           lambda lg: metric(lg[:, -1]), patch_setter=setter,
                                           activation_name=act, index_df=df, reduce="none")
    return out.values  # [cells, N]


def assert_agree(task: str, ours, tl, atol: float = 1e-4) -> None:
    if task == "attribution":
        assert compare_attribution_with_tl(ours, tl, atol) > 0
        return
    mine = ours.per_prompt.reshape(ours.per_prompt.shape[0], -1).T  # [cells, N]
    assert mine.shape == tl.shape, (mine.shape, tl.shape)
    assert torch.allclose(mine, tl.to(mine.dtype), atol=atol), (mine - tl).abs().max()
