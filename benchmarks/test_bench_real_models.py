"""Real pretrained models: SmolLM2-135M-Instruct (``load_model("smollm2")``: a Llama, 30 layers
of 9 query heads sharing 3 key-value heads, d_model 576, tied embeddings; the published Q4_1
GGUF dequantized to float32) and Gemma 3 270M (``load_model("gemma3-270m")``: 18 layers of 4
query heads sharing one key-value head, d_model 640, vocabulary 262144; Q4_K_M dequantized), on
the Jones prompt ("Michelle Jones was a top-notch student. Michelle" against "Michelle Smith
...", the model's own tokenizer, no BOS: 11 tokens for SmolLM2, differing at position 2),
metric the logit difference " Jones" - " Smith" at the last position.

On Gemma 3 a head's patch goes through the post-attention norm (recomputed on the patched
sum: README "Architectures and dtypes"), so its head-output rows are exact like SmolLM2's; a
row the engine refused would skip with the engine's reason.

Three tasks, as ``test_bench_patching.py`` runs them on random GPT-2-shaped weights:
``resid_pre`` by (layer, pos) over every layer and position, head output (``z`` by (layer,
head), all positions) over every head of every layer, and attribution patching (head outputs,
MLP outputs, embeddings, per position). Peers: TransformerLens 4.x (the same bridge, in
compatibility mode as ``load_model`` leaves it) and nnsight 0.8 (a fresh Hugging Face model of
the same checkpoint, its fastest idiomatic form: ``cases.run_nnsight``); nnsight has no
attribution-patching routine, so that row is skipped with the reason. Each peer must agree with
this engine at 1e-4: on the quick cells before it is timed (minutes of TransformerLens are not
spent on a peer that disagrees) and on the timed call's result after. Each row's ``extra_info``
carries the floor and bounds of ``floor.py`` (``conftest.record_floor``).

``pytest --benchmark-disable`` (CI) runs each once on the first and last layer only (every
position / head); attribution is one call either way. Without SmolLM2's weights every row
skips, saying how to install them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cases import TASKS, assert_agree, nnsight_model, run_nnsight, run_ours, run_tl

from conftest import ROUNDS, record_floor

pytestmark = pytest.mark.heavy  # 30 layers of TransformerLens forwards, one per patched cell

CLEAN = "Michelle Jones was a top-notch student. Michelle"
CORRUPTED = "Michelle Smith was a top-notch student. Michelle"
ANSWERS = (" Jones", " Smith")  # metric: logit(" Jones") - logit(" Smith") at the last position
IMPLS = ("transformer_lens", "nnsight", "mechtests")
MODELS = {"smollm2": ("SmolLM2-135M-Instruct", "Q4_1 dequantized to float32"),
          "gemma3-270m": ("Gemma 3 270M", "Q4_K_M dequantized to float32")}
_ours: dict = {}


@pytest.fixture(scope="module", params=list(MODELS))
def real(request):
    """The model, its engine, the Jones pair and the metric; nnsight's model on first use."""
    import torch

    from mechtests.core.engine import Engine
    from mechtests.core.metrics import logit_diff
    from mechtests.core.models import ModelUnavailable, load_model

    spec = request.param
    try:
        model = load_model(spec, device="cpu")
    except ModelUnavailable as exc:
        pytest.skip(f"{MODELS[spec][0]} rows: {exc}")
    tok = model.tokenizer

    def ids(text: str) -> torch.Tensor:
        return tok(text, add_special_tokens=False, return_tensors="pt").input_ids

    clean, corrupted = ids(CLEAN), ids(CORRUPTED)
    assert clean.shape == corrupted.shape, "the Jones pair must tokenize to the same length"
    answers = [ids(a)[0] for a in ANSWERS]
    assert all(len(a) == 1 for a in answers), answers
    differ = (clean != corrupted).any(0).nonzero().flatten()
    held: list = []

    def nnsight():
        if not held:
            held.append(nnsight_model(model))
        return held[0]

    return SimpleNamespace(spec=spec, model=model, engine=Engine(model), clean=clean,
                           corrupted=corrupted,
                           metric=logit_diff(answers[0][0], answers[1][0]),
                           differ_at=int(differ[0]), nnsight=nnsight)


def real_cells(task: str, full: bool, model, T: int) -> dict | None:
    """None (every layer x every position, or every head of every layer) for timing; under
    ``--benchmark-disable`` the first and last layer, as ``cases.cells`` does for 11 x 1."""
    if full or task == "attribution":
        return None
    last = model.cfg.n_layers - 1
    if task == "resid_pre":
        return {"layers": [0, last], "positions": list(range(T))}
    return {"layers": [0, last], "heads": list(range(model.cfg.n_heads))}


def _run(s, impl: str, task: str, sub):
    args = (task, s.clean, s.corrupted, sub)
    if impl == "mechtests":
        return run_ours(s.engine, *args, metric=s.metric)
    if impl == "transformer_lens":
        return run_tl(s.model, *args, metric=s.metric)
    return run_nnsight(s.nnsight(), *args, metric=s.metric)


def _reference(s, task: str, sub):
    """This engine's result on ``sub`` (computed once), for the peers' agreement checks."""
    key = s.spec, task, repr(sub)
    if key not in _ours:
        _ours[key] = _run(s, "mechtests", task, sub)
    return _ours[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("task", TASKS)
def test_bench_real_model(benchmark, real, task, impl):
    from mechtests.core.engine import UnsupportedArchitecture

    if impl == "nnsight" and task == "attribution":
        pytest.skip("nnsight has no attribution-patching routine to compare with")
    s = real
    name, what = MODELS[s.spec]
    N, T = s.clean.shape
    full = not benchmark.disabled
    sub = real_cells(task, full, s.model, T)
    quick = real_cells(task, False, s.model, T)
    try:
        _reference(s, task, quick)
    except UnsupportedArchitecture as exc:
        pytest.skip(f"{name}: the engine refuses {task}: {str(exc).splitlines()[0][:300]}")
    benchmark.group = f"{task} {name} Jones {T}x{N}"
    benchmark.extra_info.update({"model": f"{name} ({what})",
                                 "cells": "all" if sub is None else str(sub),
                                 "differ_at": s.differ_at})
    if impl != "mechtests" and quick != sub:  # agree on the quick cells before timing
        assert_agree(task, _reference(s, task, quick), _run(s, impl, task, quick))
    result = benchmark.pedantic(lambda: _run(s, impl, task, sub), rounds=ROUNDS, iterations=1,
                                warmup_rounds=0)
    record_floor(benchmark, s.engine, task, (T, N), sub, differ_at=s.differ_at)
    if impl != "mechtests":
        assert_agree(task, _reference(s, task, sub), result)
