"""This engine against TransformerLens: resid_pre by (layer, pos), head output over all
positions, and attribution patching. One group per task and case, parametrized by
implementation; every benchmark also asserts the two implementations agree.

``pytest benchmarks/ --benchmark-only`` measures; CI's ``--benchmark-disable`` runs each once
on smaller cell sets (see ``cases.cells``).
"""

from __future__ import annotations

import pytest
from cases import CASES, TASKS, assert_agree, cells, prompts, run_ours, run_tl

pytestmark = pytest.mark.heavy  # TransformerLens reference runs at GPT-2 scale

IMPLS = ("transformer_lens", "mechtests")
_results: dict = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("task", TASKS)
def test_bench(benchmark, gpt2_small, task, case, impl):
    model, engine = gpt2_small
    T, N = CASES[case]
    clean, corrupted = prompts(T, N)
    full = not benchmark.disabled
    sub = None if task == "attribution" else cells(task, case, full)
    benchmark.group = f"{task} {case}"
    benchmark.extra_info.update({"cells": "all" if sub is None else str(sub)})
    ours = impl == "mechtests"
    fn = (lambda: run_ours(engine, task, clean, corrupted, sub)) if ours \
        else (lambda: run_tl(model, task, clean, corrupted, sub))
    result = benchmark.pedantic(fn, rounds=3 if ours else 1, iterations=1)
    key = (task, case, full)
    _results[key, impl] = result
    other = "transformer_lens" if ours else "mechtests"
    if (key, other) not in _results:
        _results[key, other] = run_tl(model, task, clean, corrupted, sub) if ours \
            else run_ours(engine, task, clean, corrupted, sub)
    assert_agree(task, _results[key, "mechtests"], _results[key, "transformer_lens"])
