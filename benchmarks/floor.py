"""The arithmetic floor of a benchmark case: the matmul FLOPs no exact implementation can avoid,
divided by the rate this machine sustains on large float32 matmuls, measured in the same run.

``sweep_flops(shape, task, case, sub)`` counts (a multiply-add is 2 FLOPs):

* the two base runs (clean and corrupted): every layer at every position, and one logit row per
  prompt at the read position, only the vocabulary columns the metric reads (two for a logit
  difference);
* per patch and prompt, from the stage where the patch enters (a layer's attention input for
  ``resid_pre``, its MLP input for a head's output) to the end, only at positions ``>= p0``
  (earlier positions cannot change; ``p0`` is the patched position, or the first position where
  clean and corrupted differ, whichever is later); attention over all ``T`` keys, the earlier
  ones cached; the last layer's queries, attention, output and MLP only at the read position;
  a head patch's ``(z' - z) @ W_O``; one logit row (the metric's columns); patches before the
  first differing position cost nothing;
* attribution patching: the two forwards plus a backward to the activations (about one forward
  of dense matmuls and two of attention).

Norms, softmax, activation functions and the metric are not counted, so the floor is a lower
bound: ``floor seconds = sweep_flops / matmul_rate()``.

On a few short prompts the arithmetic is not what sets the time: a matmul of 11 rows reads
GPT-2 small's 7 MB-per-matrix weights from memory for 52 MFLOP of work, and that read takes
longer than the work. ``weight_pass_s`` measures one pass over the model's own block matrices
(a one-row matmul with each, in layer order, as a forward reads them); an exact implementation
reads them at least ``passes(task)`` times (once for a sweep, whose base runs and patches can all
share a pass through the layers; twice for attribution, forward and backward). The roofline
floor is the larger of the two bounds: ``max(sweep_flops / matmul_rate, passes * weight_pass_s)``.
"""

from __future__ import annotations

import time

import torch
from cases import CASES, DIFFER_AT


def _dims(shape) -> dict:
    """Sizes read from an ``Engine`` (or anything with the same attributes)."""
    return dict(L=shape.n_layers, d=shape.d_model, H=shape.n_heads, Hk=shape.n_kv_heads,
                dh=shape.d_head, mlp=shape.d_mlp * (3 if shape.gated else 2))


def _layer(D: dict, t: int, keys: int, q_rows: int | None = None) -> float:
    """One layer on ``t`` positions whose queries see ``keys`` keys on average; ``q_rows``
    positions (default ``t``) need queries, the output projection and the MLP."""
    q = t if q_rows is None else q_rows
    d, H, Hk, dh = D["d"], D["H"], D["Hk"], D["dh"]
    kv = 2 * d * 2 * Hk * dh * t
    dense = q * (2 * d * H * dh + 2 * H * dh * d) + _mlp(D, q)
    attn = q * 2 * 2 * H * dh * keys
    return kv + dense + attn


def _mlp(D: dict, rows: int) -> float:
    """The MLP's matmuls (two, or three when gated) on ``rows`` positions."""
    return rows * 2 * D["d"] * D["mlp"]


def _forward(D: dict, T: int, cols: int) -> float:
    """A full forward of one prompt: every layer at every position, one logit row."""
    causal = (T + 1) / 2  # mean keys per query
    return D["L"] * _layer(D, T, causal) + 2 * D["d"] * cols


def _patch(D: dict, T: int, entry_stage: int, p0: int, read: int, cols: int) -> float:
    """One patch of one prompt entering at ``entry_stage`` with window ``p0..T-1``."""
    if read < p0:
        return 0.0
    L, t = D["L"], T - p0
    first, odd = divmod(entry_stage, 2)
    total = 0.0
    for layer in range(first, L):
        last = layer == L - 1
        if layer == first and odd:  # enters at the MLP input: only the MLP of this layer
            total += _mlp(D, 1 if last else t)
            continue
        causal = (p0 + 1 + T) / 2  # mean keys per query over the window
        total += _layer(D, t, T if last else causal, q_rows=1 if last else None)
    return total + 2 * D["d"] * cols


def case_shape(case) -> tuple[int, int]:
    """``(tokens, prompts)`` of a case: a name in ``CASES`` or the pair itself (a real model's
    own prompts)."""
    return CASES[case] if isinstance(case, str) else tuple(case)


def sweep_flops(shape, task: str, case, sub: dict | None, cols: int = 2,
                differ_at: int = DIFFER_AT) -> float:
    """Floor FLOPs of one benchmark call (``sub`` as ``cases.cells``); ``cols``: the vocabulary
    columns the metric reads; ``differ_at``: the first position where clean and corrupted
    differ."""
    D = _dims(shape)
    T, N = case_shape(case)
    base = 2 * N * _forward(D, T, cols)
    if task == "attribution":  # 2 forwards + backward to the activations
        causal = (T + 1) / 2
        attn = D["L"] * T * 2 * 2 * D["H"] * D["dh"] * causal
        return base + N * (_forward(D, T, cols) + attn)
    sub = sub or {}
    layers = sub.get("layers", range(D["L"]))
    total = 0.0
    if task == "resid_pre":
        for layer in layers:
            for p in sub.get("positions", range(T)):
                if p >= differ_at:
                    total += _patch(D, T, 2 * layer, p, T - 1, cols)
    else:  # a head's output at every position: enters at the layer's MLP input
        heads = len(sub.get("heads", range(D["H"])))
        for layer in layers:
            total += heads * (_patch(D, T, 2 * layer + 1, differ_at, T - 1, cols)
                              + 2 * D["dh"] * D["d"] * (T - differ_at))
    return base + N * total


def matmul_rate(timer=time.perf_counter, repeats: int = 5) -> float:
    """FLOP/s this process sustains on float32 matmuls of 512 rows (GPT-2-small's widths), at
    torch's current thread count: the best of ``repeats`` timings of each shape, and the best
    shape. ``timer`` should be the benchmark's (CPU time at one thread)."""
    g = torch.Generator().manual_seed(0)
    best = 0.0
    for k, n in ((768, 3072), (3072, 768), (768, 2304)):
        a, b = torch.randn(512, k, generator=g), torch.randn(k, n, generator=g)
        a @ b  # warm up
        for _ in range(repeats):
            t0 = timer()
            for _ in range(4):
                a @ b
            dt = timer() - t0
            if dt > 0:
                best = max(best, 4 * 2 * 512 * k * n / dt)
    return best


def passes(task: str) -> int:
    """The least number of times an exact implementation reads every block matrix."""
    return 2 if task == "attribution" else 1


def _block_matrices(engine) -> list[torch.Tensor]:
    """Every layer's QKV, O and MLP matrices, in the order a forward reads them."""
    mats = []
    for layer in range(engine.n_layers):
        mats += [engine.W_QKV[layer], engine.W_O_flat[layer], engine.W_in[layer],
                 engine.W_out_raw[layer]]
        if engine.gated:
            mats.append(engine.W_gate[layer])
    return mats


def weight_pass_s(engine, timer=time.perf_counter, repeats: int = 5) -> float:
    """Seconds one pass over the engine's block matrices takes at this machine's memory rate:
    a one-row matmul with each (QKV, O, MLP in and out per layer), in layer order; the best of
    ``repeats``."""
    mats = _block_matrices(engine)
    rows = {m.shape[0]: torch.ones(1, m.shape[0], dtype=m.dtype) for m in mats}
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        t0 = timer()
        for m in mats:
            rows[m.shape[0]] @ m
        best = min(best, timer() - t0)
    return best


def attribution_matmuls_s(engine, rows: int, timer=time.perf_counter, repeats: int = 3) -> float:
    """Seconds the matmuls alone of an exact attribution patch take at the rows the problem has
    (``rows`` = prompts x tokens): each layer's QKV, O and MLP matrices on ``2 * rows`` rows
    (the clean and corrupted forwards, batched) and their gradient to the input on ``rows``
    rows (``g @ W.T``), with the engine's own weights, the best of ``repeats``. Unlike
    ``sweep_flops``, whose rate is that of 512-row matmuls, this is the least time these
    matmuls take on this machine at the sizes one call of the problem allows: a lower bound
    for every exact implementation that runs one call at a time."""
    mats = _block_matrices(engine)
    fwd = {m.shape[0]: torch.ones(2 * rows, m.shape[0], dtype=m.dtype) for m in mats}
    bwd = {m.shape[1]: torch.ones(rows, m.shape[1], dtype=m.dtype) for m in mats}
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        t0 = timer()
        for m in mats:
            fwd[m.shape[0]] @ m
        for m in reversed(mats):
            bwd[m.shape[1]] @ m.t()
        best = min(best, timer() - t0)
    return best
