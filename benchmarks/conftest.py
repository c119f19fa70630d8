"""A GPT-2-small-shaped model with random weights (GPT2Config() defaults), built offline; the
shared round count and the floor column."""

from __future__ import annotations

import os

import pytest

ROUNDS = int(os.environ.get("MECHTESTS_BENCH_ROUNDS", "3"))  # the same for every implementation


@pytest.fixture(scope="session")
def gpt2_small_dir(tmp_path_factory):
    from mechtests.testing import save_gpt2_shaped_checkpoint

    return save_gpt2_shaped_checkpoint(tmp_path_factory.mktemp("gpt2_small") / "model")


@pytest.fixture(scope="session")
def gpt2_small(gpt2_small_dir):
    from mechtests.core.engine import Engine
    from mechtests.core.models import load_model

    model = load_model(str(gpt2_small_dir), device="cpu")
    return model, Engine(model)


@pytest.fixture(scope="session")
def nnsight_gpt2(gpt2_small):
    """nnsight's LanguageModel on the same checkpoint, built on first use."""
    from cases import nnsight_model

    held = []

    def get():
        if not held:
            held.append(nnsight_model(gpt2_small[0]))
        return held[0]

    return get


_rate: dict = {}


def record_floor(benchmark, engine, task: str, case, sub, differ_at: int | None = None) -> None:
    """Put the case's floor (``floor.py``) and this row's distance to it in ``extra_info``;
    the matmul rate (the best in this run) and the time of one pass over the weights (the
    least in this run) are measured with the benchmark's timer. ``case``: a name in
    ``cases.CASES`` or ``(tokens, prompts)``; ``differ_at``: the first position where clean and
    corrupted differ (default ``cases.DIFFER_AT``)."""
    import floor
    from cases import DIFFER_AT

    if benchmark.disabled:
        return
    timer = benchmark._timer
    # the best rate seen in this run, re-measured at every row: one quick measurement taken
    # while another job shares the memory bus reads low (128 against 150 GFLOP/s seen here),
    # and a low rate flatters every row's distance to its floor
    _rate["rate"] = max(_rate.get("rate", 0.0), floor.matmul_rate(timer))
    shape = (engine.n_layers, engine.d_model, engine.d_mlp, engine.n_heads, engine.n_kv_heads,
             engine.gated)
    _rate[shape] = min(_rate.get(shape, float("inf")), floor.weight_pass_s(engine, timer))
    flops = floor.sweep_flops(engine, task, case, sub,
                              differ_at=DIFFER_AT if differ_at is None else differ_at)
    floor_s = flops / _rate["rate"]
    memory_s = floor.passes(task) * _rate[shape]
    best = benchmark.stats.stats.min
    benchmark.extra_info.update({"gflop": round(flops / 1e9, 2),
                                 "matmul_gflops": round(_rate["rate"] / 1e9, 1),
                                 "floor_s": round(floor_s, 3),
                                 "x_floor": round(best / floor_s, 2),
                                 "weight_reads_s": round(memory_s, 3),
                                 "x_roofline": round(best / max(floor_s, memory_s), 2)})
    if task == "attribution":  # the matmuls alone, at the rows one call has
        T, N = floor.case_shape(case)
        key = (shape, "attribution", N * T)
        _rate[key] = min(_rate.get(key, float("inf")),
                         floor.attribution_matmuls_s(engine, N * T, timer))
        benchmark.extra_info.update({"matmuls_at_rows_s": round(_rate[key], 3),
                                     "x_matmuls_at_rows": round(best / _rate[key], 2)})
