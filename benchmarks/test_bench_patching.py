"""This engine against TransformerLens and nnsight 0.8: resid_pre by (layer, pos), head output
over all positions, and attribution patching (TransformerLens only: nnsight has no
attribution-patching routine). One group per task and case, parametrized by implementation;
every implementation is timed with the same number of rounds (``MECHTESTS_BENCH_ROUNDS``,
default 3) and must agree with this engine at 1e-4.

Each row's ``extra_info`` carries the case's arithmetic floor (``floor.py``): ``floor_s``, the
floor's FLOPs over the matmul rate measured in this run with the benchmark's own timer, and
``x_floor``, the row's best time over it; ``weight_reads_s``, the least time the reads of the
weights take (one pass for a sweep, two for attribution), and ``x_roofline``, the best time over
the larger of the two bounds. Measure CPU time at one thread on a shared machine:

    OMP_NUM_THREADS=1 taskset -c 0 pytest benchmarks/test_bench_patching.py --benchmark-only \\
        --benchmark-timer=time.process_time

``pytest --benchmark-disable`` (CI) runs each once on smaller cell sets (``cases.cells``).
"""

from __future__ import annotations

import pytest
from cases import CASES, TASKS, assert_agree, cells, prompts, run_nnsight, run_ours, run_tl

from conftest import ROUNDS, record_floor

pytestmark = pytest.mark.heavy  # TransformerLens and nnsight reference runs at GPT-2 scale

IMPLS = ("transformer_lens", "nnsight", "mechtests")
_results: dict = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("task", TASKS)
def test_bench(benchmark, gpt2_small, nnsight_gpt2, task, case, impl):
    if impl == "nnsight" and task == "attribution":
        pytest.skip("nnsight has no attribution-patching routine to compare with")
    model, engine = gpt2_small
    T, N = CASES[case]
    clean, corrupted = prompts(T, N)
    full = not benchmark.disabled
    sub = None if task == "attribution" else cells(task, case, full)
    benchmark.group = f"{task} {case}"
    benchmark.extra_info.update({"cells": "all" if sub is None else str(sub)})
    run = {"mechtests": lambda: run_ours(engine, task, clean, corrupted, sub),
           "transformer_lens": lambda: run_tl(model, task, clean, corrupted, sub),
           "nnsight": lambda: run_nnsight(nnsight_gpt2(), task, clean, corrupted, sub)}
    result = benchmark.pedantic(run[impl], rounds=ROUNDS, iterations=1, warmup_rounds=0)
    record_floor(benchmark, engine, task, case, sub)
    key = (task, case, full)
    _results[key, impl] = result
    if (key, "mechtests") not in _results:
        _results[key, "mechtests"] = run["mechtests"]()
    if impl != "mechtests":
        assert_agree(task, _results[key, "mechtests"], result)
