"""Exact activation patching, ablation, path patching and attribution patching, batched.

Everything goes through one core (:func:`_patch_core`). A *patch* is a change to the residual
stream at one *stage* of the forward (a layer's attention input or MLP input), from a first
changed position ``p0`` on; every site reduces to that:

* resid_pre / resid_mid / resid_post, attn_out, mlp_out: the source activation minus the base
  one, added where it enters the residual stream;
* a head's z, q, k, v or pattern: the head's new output ``z'`` (recomputed from the patched
  q, k, v or pattern with the base run's other inputs), as ``(z' - z) @ W_O`` at that layer's
  MLP input;
* an MLP neuron: ``(post' - post) * W_out[neuron]`` at the next layer's input.

Where a norm follows attention or the MLP (Gemma 3), the change a head or neuron makes is not
linear: the post-norm of the base run's branch output plus the change is recomputed, and the
residual stream takes its difference from the base's (``Engine.post_delta``), so these patches
stay exact.

Patches that share ``p0`` run as one batch that grows as the forward reaches each patch's stage
(layers that cannot change are never recomputed); positions before ``p0`` are never recomputed
(their keys and values come from the base run's cache); the last layer and the unembedding run
only at the read position; the batch is chunked to ``memory_budget_mb``. The unpatched runs a
sweep needs ride in its first batch, in the same matmuls, each patch's entry read from their
cache as the forward reaches it.

Conventions. ``direction="denoise"`` patches clean activations into the corrupted run (the
result is the corrupted run's metric after the patch); ``"noise"`` patches corrupted into clean.
The metric takes logits at the read position, ``(..., n_prompts, d_vocab)``, and returns
``(..., n_prompts)``. Results have a per-prompt axis and the metric means ``r.clean``,
``r.corrupted`` (per prompt: ``r.clean_per_prompt``, ...), so ``r.restored()`` gives
restoration. Every public function takes a model or its ``Engine``
(``engine_for``). Components are named ``"9.9"`` (layer 9 head 9), ``"attn9"`` / ``"mlp9"``
(a layer's attention or MLP output), ``"mlp9.1234"`` (neuron 1234 of layer 9's MLP).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import groupby, product

import torch

from mechtests.core.engine import Ctx, Edit, Engine, Window, engine_for
from mechtests.core.progress import progress
from mechtests.core.result import Result
from mechtests.core.sites import Component, Head, LayerOut, component

Metric = Callable[[torch.Tensor], torch.Tensor]

# site -> (TL hook suffix, stage offset from 2*layer where its change enters the residual)
RESID_SITES = {"resid_pre": ("hook_resid_pre", 0), "resid_mid": ("hook_resid_mid", 1),
               "resid_post": ("hook_resid_post", 2), "attn_out": ("hook_attn_out", 1),
               "mlp_out": ("hook_mlp_out", 2)}
HEAD_SITES = {"z": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
              "pattern": "attn.hook_pattern"}
NEURON_SITES = {"mlp_post": "mlp.hook_post"}
SITES = (*RESID_SITES, *HEAD_SITES, *NEURON_SITES)
_BY = {**{s: (("layer", "pos"), ("layer",)) for s in RESID_SITES},
       **{s: (("layer", "head"), ("layer", "head", "pos")) for s in HEAD_SITES},
       "mlp_post": (("layer", "neuron"),)}


# -- checks -----------------------------------------------------------------------------------
def _check_site(site: str) -> None:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")


def _check_range(what: str, values: Iterable[int], n: int, hint: str = "") -> list[int]:
    values = [int(v) for v in values]
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise ValueError(f"{what} {bad[0]} out of range: valid {what}s are 0..{n - 1}{hint}")
    return values


def _read_positions(read_pos, n: int, T: int, device) -> torch.Tensor:
    """The read position per prompt, ``[n]`` in ``0..T-1`` (negative counts from the end)."""
    rp = torch.as_tensor(read_pos, device=device).long().reshape(-1).expand(n)
    if ((rp < -T) | (rp >= T)).any():
        raise ValueError(f"read position {rp.tolist()} beyond the prompt: positions are "
                         f"0..{T - 1} (or -{T}..-1)")
    return rp % T


def _call_metric(metric: Metric, logits: torch.Tensor, engine: Engine | None = None,
                 tokens: torch.Tensor | None = None, patches: Sequence[tuple] | None = None
                 ) -> torch.Tensor:
    """Apply the metric, insisting on one finite value per prompt (per patch).

    A NaN or infinite value raises ``MetricError`` naming the prompt (its text, from ``tokens``)
    and the patch (from ``patches``, one key per leading row): never a silent NaN heatmap.
    """
    out = torch.as_tensor(metric(logits))
    if tuple(out.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"the metric must return one value per prompt: given logits of shape "
            f"{tuple(logits.shape)} (..., n_prompts, d_vocab) it returned shape "
            f"{tuple(out.shape)}, expected {tuple(logits.shape[:-1])}. Reduce over the vocab "
            "only, not over prompts (no .mean() over the batch).")
    bad = ~torch.isfinite(out)
    if bad.any():
        from mechtests.core.metrics import MetricError

        where = bad.reshape(-1, bad.shape[-1]) if bad.dim() else bad.reshape(1, 1)
        row, i = (int(x) for x in where.nonzero()[0])
        value = out.reshape(where.shape)[row, i].item()
        text = ""
        tok = getattr(engine, "tokenizer", None)
        if tokens is not None and tok is not None:
            try:
                text = f" ({tok.decode(tokens[i].tolist())!r})"
            except Exception:  # noqa: BLE001 - the index alone still names the prompt
                pass
        patch = f" after patch {patches[row]}" if patches is not None and row < len(patches) \
            else (" in the unpatched run" if patches is None and out.dim() <= 1 else "")
        raise MetricError(
            f"the metric returned {value} for prompt {i}{text}{patch} ({int(bad.sum())} "
            f"non-finite value(s) in all): every value must be finite, or the heatmap is "
            f"meaningless. Check the metric (a log of 0, a division by 0) and the answer "
            f"tokens of that prompt.")
    return out


def _score(engine: Engine, metric: Metric, x: torch.Tensor, tokens: torch.Tensor | None = None,
           patches: Sequence[tuple] | None = None, budget_mb: float | None = None
           ) -> torch.Tensor:
    """The metric of final residuals ``x`` ``[..., n_prompts, d]`` at the read position.

    A metric that declares the token ids it reads (``metric.reads``, as ``logit_diff``) gets
    only those logits; any other gets the whole row, unembedded in blocks of leading rows that
    fit ``budget_mb``."""
    reads = getattr(metric, "reads", None)
    if reads is not None:
        return _call_metric(metric.on_columns, engine.unembed_columns(x, reads), engine, tokens,
                            patches)
    if x.dim() < 3 or budget_mb is None:
        return _call_metric(metric, engine.unembed(x), engine, tokens, patches)
    row = x.shape[1:-1].numel() * engine.d_vocab * 4
    step = max(1, int(budget_mb * 2**20 // row))
    return torch.cat([_call_metric(metric, engine.unembed(x[c:c + step]), engine, tokens,
                                   None if patches is None else patches[c:c + step])
                      for c in range(0, len(x), step)])


def _pair(engine: Engine, clean, corrupted) -> tuple[torch.Tensor, torch.Tensor]:
    clean, corrupted = engine.check_tokens(clean), engine.check_tokens(corrupted)
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} "
                         "tokens must have the same shape [n_prompts, T] (pad or re-template)")
    return clean, corrupted


def _pos_labels(engine: Engine, tokens: torch.Tensor) -> list[str]:
    ids = tokens[0].tolist()
    tok = engine.tokenizer
    try:
        words = tok.convert_ids_to_tokens(ids)
    except Exception:  # no tokenizer: index only
        words = [str(i) for i in ids]
    return [f"{i} {w}" for i, w in enumerate(words)]


# -- runs -------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One unpatched run: its cache (TL names), read positions, final residual and metric."""

    tokens: torch.Tensor
    cache: Mapping[str, torch.Tensor]
    rp: torch.Tensor
    final: torch.Tensor | None  # [N, d] residual at the read position (None: not run yet)
    metric: torch.Tensor | None  # [N]


def _run(engine: Engine, tokens, want: Iterable[str], metric: Metric, rp) -> _Run:
    """One unpatched run of ``[N, T]`` prompts: its cache of ``want``, final residual, metric."""
    return _runs(engine, (tokens,), want, metric, rp)[0]


class _RowView(Mapping):
    """One run's rows of a cache that several runs fill together (views, taken on access)."""

    def __init__(self, cache: dict[str, torch.Tensor], rows: slice) -> None:
        self._cache, self._rows = cache, rows

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._cache[name][self._rows]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cache)

    def __len__(self) -> int:
        return len(self._cache)


@dataclass
class _Lead:
    """Unpatched runs not run yet: ``window`` (hooked, all positions) rides in the first patched
    batch, so they and the first patches read the weights once, in the same matmuls;
    ``finish`` takes its final residual ``[M, 1, T, d]`` and fills in the runs."""

    window: Window
    finish: Callable[[torch.Tensor], None]


# Up to this many rows (prompts x tokens of the unpatched runs together) a sweep's unpatched runs
# ride in its first patched batch: on so few rows their own matmuls run far below the machine's
# rate (25-65 GFLOP/s on 11-22 rows against 150 on 512, GPT-2 small's widths, one core;
# measured, interleaved: resid_pre 11 tokens x 1 prompt 0.61 -> 0.54 s). From about 66 rows on
# they run at 85-120 and riding along gained nothing (128 and 176 rows: 0 to 6% slower, within
# the noise), while it enlarges the first batch beyond its budget.
LEAD_ROWS = 64


def _runs(engine: Engine, tokens: Sequence[torch.Tensor], want: Iterable[str], metric: Metric,
          rp, defer: bool = False) -> list[_Run] | tuple[list[_Run], _Lead]:
    """Several unpatched runs of ``[N, T]`` prompts as one forward (one read of the weights,
    bigger matmuls), each with its own cache. ``defer``: run nothing yet; return the runs (their
    caches fill as the forward goes) and the :class:`_Lead` that runs them (``_patch_core``),
    or None when they have more than ``LEAD_ROWS`` rows (then they have run)."""
    ctx = Ctx(set(want))
    rows, o = [], 0
    for t in tokens:
        rows.append(slice(o, o + len(t)))
        o += len(t)
    runs = [_Run(t, _RowView(ctx.cache, r), rp, None, None) for t, r in zip(tokens, rows)]

    def finish(x: torch.Tensor) -> None:
        x = x[:, 0]
        final = x[torch.arange(len(x), device=x.device), rp.repeat(len(tokens))]
        for run, r in zip(runs, rows):
            run.final = final[r]
            run.metric = _score(engine, metric, run.final, run.tokens)

    lead = _Lead(Window(0, [], None, {0: engine.embed(torch.cat(list(tokens)), ctx)}, ctx),
                 finish)
    if defer and sum(t.numel() for t in tokens) <= LEAD_ROWS:
        return runs, lead
    finish(engine.forward_wave([lead.window])[0])
    return (runs, None) if defer else runs


def _stage_name(engine: Engine, stage: int) -> str:
    stage = _entry_stage(engine, stage)
    layer, odd = divmod(stage, 2)
    if layer == engine.n_layers:
        return f"blocks.{layer - 1}.hook_resid_post"
    return f"blocks.{layer}.hook_resid_{'mid' if odd else 'pre'}"


def _entry_stage(engine: Engine, stage: int) -> int:
    """Where a change enters: in a parallel block (attention and MLP both read resid_pre) a
    change to the attention output does not reach its own layer's MLP, so it enters at the
    next layer's input, where it adds the same amount."""
    return stage + stage % 2 if engine.parallel else stage


def _check_supported(engine: Engine, site: str, what: str = "patching") -> None:
    """Refuse, by name, the sites whose exact patch the engine lacks for this architecture."""
    from mechtests.core.engine import UnsupportedArchitecture

    if site == "resid_mid" and engine.parallel:
        raise UnsupportedArchitecture(
            f"{engine.family} has parallel attention and MLP blocks: there is no resid_mid "
            "(both read resid_pre). Patch resid_pre, attn_out or mlp_out instead.")
    if site in ("k", "v") and engine.group > 1 and what != "patching":
        raise UnsupportedArchitecture(
            f"{what} of {site} on {engine.family}: its {engine.n_heads} query heads share "
            f"{engine.n_kv_heads} key-value heads (grouped-query attention), which {what} "
            "does not implement; sweep() patches k and v per key-value head.")


# -- the core ---------------------------------------------------------------------------------
@dataclass
class _Patches:
    """A family of patches: keys, and per key its stage and first changed position."""

    keys: list[tuple]
    stage: Callable[[tuple], int]
    span: Callable[[tuple], tuple[int, int]]  # first and last position changed at entry
    delta: Callable[[list[tuple], int], torch.Tensor]  # keys (one stage), p0 -> [N,P,T-p0,d]
    want: set[str]  # base-run activations the deltas read


def _patch_core(engine: Engine, patches: _Patches, base: _Run, metric: Metric,
                budget_mb: float, same_before: int = 0, lead: _Lead | None = None
                ) -> torch.Tensor:
    """The metric after each patch, ``[n_keys, n_prompts]``.

    ``same_before``: the base and source runs agree at positions before it (their tokens do),
    so a patch there changes nothing and a patch's window can start there. ``lead``: the base
    (and source) runs, not run yet: they run in the first batch, each patch's entry and prefix
    read from their cache as the forward reaches it.
    """
    N, T = base.tokens.shape
    p0_of = [max(patches.span(k)[0], same_before) for k in patches.keys]
    as_base = [i for i, k in enumerate(patches.keys) if patches.span(k)[1] < same_before]
    skip = set(as_base)
    stage_of = lambda k: _entry_stage(engine, patches.stage(k))  # noqa: E731
    order = sorted((i for i in range(len(patches.keys)) if i not in skip),
                   key=lambda i: (p0_of[i], stage_of(patches.keys[i])))
    pos = torch.arange(T, device=base.tokens.device)
    rotated: dict[int, tuple | None] = {}

    def kv(layer: int, p0: int):
        """The base run's keys (rotary applied once per sweep) and values before ``p0``."""
        if layer not in rotated:
            k = base.cache.get(f"blocks.{layer}.attn.hook_k")
            rotated[layer] = None if k is None else (
                engine.rotate(k, pos), base.cache[f"blocks.{layer}.attn.hook_v"])
        got = rotated[layer]
        return None if got is None else (got[0][:, :p0], got[1][:, :p0])

    def entry(stage: int, p0: int, ks: list[tuple]) -> torch.Tensor:
        resid = base.cache[_stage_name(engine, stage)][:, None, p0:]
        return resid + patches.delta(ks, p0)

    # Batches across first positions, each within the budget; in a batch every window runs
    # through each layer's norms, projections and MLP as one matmul (Engine.forward_wave).
    batches: list[list[int]] = [[]]
    used = 0.0
    for p0, group in groupby(order, key=lambda i: p0_of[i]):
        group = list(group)
        if not (base.rp >= p0).any():  # no prompt's read position can see these patches
            as_base += group
            continue
        per_patch = engine.W_E.element_size() * N * (T - p0) * (
            8 * engine.d_model + 4 * engine.n_heads * T + 3 * engine.d_mlp)
        for i in group:
            if batches[-1] and used + per_patch > budget_mb * 2**20:
                batches.append([])
                used = 0.0
            batches[-1].append(i)
            used += per_patch
    done: list[int] = []  # patches whose final residual is in ``finals``, in order
    finals: list[torch.Tensor] = []
    for part in progress([b for b in batches if b], desc="patching", unit="batch"):
        windows, parts = [], []
        for p0, idx in groupby(part, key=lambda i: p0_of[i]):
            entries = {}
            for stage, ids in groupby(idx, key=lambda i: stage_of(patches.keys[i])):
                ids = list(ids)
                parts.append((p0, ids))
                entries[stage] = partial(entry, stage, p0, [patches.keys[i] for i in ids])
            windows.append(Window(p0, partial(kv, p0=p0), base.rp - p0, entries))
        xs = engine.forward_wave(([lead.window] if lead else []) + windows)
        if lead:
            lead.finish(xs.pop(0))
            lead = None
        for (p0, ids), x in zip(_by_window(parts, windows), xs):
            x = torch.where((base.rp >= p0)[:, None, None], x[:, :, 0], base.final[:, None])
            finals.append(x.transpose(0, 1))
            done += ids
    if lead:  # no patch ran: the runs alone
        lead.finish(engine.forward_wave([lead.window])[0])
    out = torch.empty(len(patches.keys), N, device=base.metric.device, dtype=base.metric.dtype)
    out[as_base] = base.metric
    if done:  # the unembedding and the metric once for the whole sweep
        out[done] = _score(engine, metric, torch.cat(finals), base.tokens,
                           [patches.keys[i] for i in done], budget_mb)
    return out


def _by_window(parts: list[tuple[int, list[int]]], windows: list[Window]):
    """The patches of each window, in the order its batch holds them (by entry stage)."""
    for w in windows:
        yield w.p0, [i for p0, ids in parts if p0 == w.p0 for i in ids]


def _resid_patches(engine: Engine, site: str, keys, base: _Run, src: dict) -> _Patches:
    """resid_pre/mid/post, attn_out, mlp_out at (layer, pos) or (layer,) = all positions."""
    hook, off = RESID_SITES[site]
    names = {lay: f"blocks.{lay}.{hook}" for lay in {k[0] for k in keys}}

    def delta(ks, p0):
        diff = torch.stack([src[names[k[0]]][:, p0:] - base.cache[names[k[0]]][:, p0:]
                            for k in ks], 1)
        return diff if len(ks[0]) == 1 else _first_row(diff)

    T = base.tokens.shape[1]
    want = set(names.values()) | {_stage_name(engine, 2 * k[0] + off) for k in keys}
    return _Patches(keys, lambda k: 2 * k[0] + off,
                    lambda k: (k[1], k[1]) if len(k) > 1 else (0, T - 1), delta, want)


def _first_row(x: torch.Tensor) -> torch.Tensor:
    """Zero all window positions but the first (a patch at position p0 only)."""
    out = torch.zeros_like(x)
    out[:, :, 0] = x[:, :, 0]
    return out


def _head_patches(engine: Engine, site: str, keys, base: _Run, src: dict) -> _Patches:
    """A head's z, q, k, v or pattern, at all positions (layer, head) or (layer, head, pos)."""
    b = base.cache
    memo: dict[int, torch.Tensor] = {}

    def name(lay, s):
        return f"blocks.{lay}.{HEAD_SITES[s]}"

    def new_z_all(lay):  # z of every head with this site patched at all positions [N,T,H,dh]
        if lay not in memo:
            q, k, v, pat = (b.get(name(lay, s)) for s in ("q", "k", "v", "pattern"))
            if site == "z":
                memo[lay] = src[name(lay, "z")]
            elif site == "pattern":
                memo[lay] = torch.einsum("nhqk,nkhe->nqhe", src[name(lay, "pattern")],
                                         v.repeat_interleave(engine.group, 2))
            elif site == "v":
                memo[lay] = torch.einsum("nhqk,nkhe->nqhe", pat,
                                         src[name(lay, "v")].repeat_interleave(engine.group, 2))
            else:
                q, k = (src[name(lay, "q")], k) if site == "q" else (q, src[name(lay, "k")])
                memo[lay] = _attend(engine, lay, q, k, v)
        return memo[lay]

    def delta(ks, p0):
        """Keys index query heads, or key-value heads for k and v: a key-value head feeds a
        group of G query heads (grouped-query attention), whose outputs all change."""
        lay, dev = ks[0][0], base.tokens.device
        G = engine.group if site in ("k", "v") else 1
        idx = torch.tensor([k[1] for k in ks], device=dev)
        qh = idx[:, None] * G + torch.arange(G, device=dev)  # [P, G] query heads
        z = b[name(lay, "z")][:, :, qh].permute(0, 2, 3, 1, 4)  # [N,P,G,T,dh]
        if len(ks[0]) == 2 or site in ("z", "q", "pattern"):
            dz = new_z_all(lay)[:, p0:, qh].permute(0, 2, 3, 1, 4) - z[:, :, :, p0:]
            if len(ks[0]) == 3:  # by position: only row p0 changes
                dz[:, :, :, 1:] = 0
        elif site == "v":  # queries >= p0 see the new value at p0 with the old weight
            pat = b[name(lay, "pattern")][:, qh, p0:, p0]  # [N,P,G,t]
            dv = (src[name(lay, "v")] - b[name(lay, "v")])[:, p0, idx]  # [N,P,dh]
            dz = pat[..., None] * dv[:, :, None, None]
        else:  # k at p0: column p0 of the scores changes for queries >= p0
            N, T = base.tokens.shape
            P = len(ks)
            q = b[name(lay, "q")][:, p0:, qh].reshape(N, T - p0, P * G, -1)
            q = engine.rotate(q, torch.arange(p0, T, device=dev), lay).view(N, T - p0, P, G,
                                                                               -1)
            kn = engine.rotate(src[name(lay, "k")][:, p0:p0 + 1, idx],
                               torch.tensor([p0], device=dev), lay)[:, 0]  # [N,P,dh]
            scores = b[f"blocks.{lay}.attn.hook_attn_scores"][:, qh, p0:].clone()
            new = (q.permute(0, 2, 3, 1, 4) * kn[:, :, None, None]).sum(-1) * engine.scale
            cut = _masked(engine, lay, torch.arange(p0, T, device=dev),
                          torch.tensor([p0], device=dev))[:, 0]  # [T-p0]: outside a window
            scores[..., p0] = new.masked_fill(cut, float("-inf"))
            v = b[name(lay, "v")][:, :, idx].permute(0, 2, 1, 3)[:, :, None]  # [N,P,1,T,dh]
            dz = scores.float().softmax(-1).to(v.dtype) @ v - z[:, :, :, p0:]
        change = torch.einsum("npgte,pged->nptd", dz, engine.W_O_raw[lay][qh])
        if engine.post_norms is None:
            return change
        before = engine.branch_sum(lay, 0, b[name(lay, "z")][:, p0:])  # [N,T-p0,d]
        return engine.post_delta(lay, 0, before[:, None], change)

    layers = {k[0] for k in keys}
    need = {"z": ("z",), "q": ("k", "v"), "k": ("q", "v", "attn_scores", "pattern"),
            "v": ("v", "pattern"), "pattern": ("v",)}[site]
    want = {name(lay, "z") for lay in layers} | {_stage_name(engine, 2 * lay + 1)
                                                  for lay in layers}
    want |= {f"blocks.{lay}.attn.hook_{s}" for lay in layers for s in need}
    T = base.tokens.shape[1]
    return _Patches(keys, lambda k: 2 * k[0] + 1,
                    lambda k: (k[2], k[2]) if len(k) == 3 else (0, T - 1), delta, want)


def _attend(engine: Engine, layer: int, q, k, v) -> torch.Tensor:
    """Layer ``layer``'s causal attention (its rotary table and sliding window) of TL-shaped
    q, k, v ``[N,T,H,dh]`` -> z ``[N,T,H,dh]``."""
    T = q.shape[1]
    pos = torch.arange(T, device=q.device)
    q, k = engine.rotate(q, pos, layer), engine.rotate(k, pos, layer)
    k, v = k.repeat_interleave(engine.group, 2), v.repeat_interleave(engine.group, 2)
    s = torch.einsum("nqhe,nkhe->nhqk", q, k) * engine.scale
    s = s.masked_fill(_masked(engine, layer, pos, pos), float("-inf"))
    return torch.einsum("nhqk,nkhe->nqhe", s.float().softmax(-1).to(v.dtype), v)


def _masked(engine: Engine, layer: int, queries: torch.Tensor, keys: torch.Tensor
            ) -> torch.Tensor:
    """``[q, k]``: the keys a query at each position cannot read at ``layer``: later ones, and
    those outside its sliding window where the layer has one."""
    out = keys[None] > queries[:, None]
    window = engine.windows[layer] if engine.windows is not None else None
    if window is not None:
        out = out | (keys[None] <= queries[:, None] - window)
    return out


def _neuron_patches(engine: Engine, keys, positions: list[int], base: _Run,
                    src: dict) -> _Patches:
    """MLP neurons (layer, neuron) at the given positions, entering at the next layer."""
    def delta(ks, p0):
        pos = torch.tensor([p for p in positions if p >= p0], device=base.tokens.device)
        lay = ks[0][0]
        ns = torch.tensor([k[1] for k in ks], device=pos.device)
        name = f"blocks.{lay}.mlp.hook_post"
        d_post = (src[name] - base.cache[name])[:, pos][:, :, ns]  # [N,S,P]
        out = d_post.new_zeros(d_post.shape[0], len(ks), base.tokens.shape[1] - p0,
                               engine.d_model)
        change = torch.einsum("nsp,pd->npsd", d_post, engine.W_out_raw[lay, ns])
        if engine.post_norms is not None:
            before = engine.branch_sum(lay, 1, base.cache[name][:, pos])  # [N,S,d]
            change = engine.post_delta(lay, 1, before[:, None], change)
        out[:, :, pos - p0] = change
        return out

    layers = {k[0] for k in keys}
    want = {f"blocks.{lay}.mlp.hook_post" for lay in layers}
    want |= {_stage_name(engine, 2 * lay + 2) for lay in layers}
    span = (min(positions), max(positions))
    return _Patches(keys, lambda k: 2 * k[0] + 2, lambda k: span, delta, want)


def _prefix_want(engine: Engine, patches: _Patches) -> set[str]:
    first = min(patches.stage(k) for k in patches.keys) // 2
    return {f"blocks.{lay}.attn.hook_{s}" for lay in range(first, engine.n_layers)
            for s in ("k", "v")}


def _make_patches(engine, site, keys, base, src, positions=None) -> _Patches:
    if site in RESID_SITES:
        return _resid_patches(engine, site, keys, base, src)
    if site in HEAD_SITES:
        return _head_patches(engine, site, keys, base, src)
    return _neuron_patches(engine, keys, positions, base, src)


def _site_want(engine: Engine, site: str, layers: Iterable[int]) -> set[str]:
    """Source-run activations a site's patches read."""
    hook = {**{s: h for s, (h, _) in RESID_SITES.items()}, **HEAD_SITES, **NEURON_SITES}[site]
    return {f"blocks.{lay}.{hook}" for lay in layers}


# -- sweeps -----------------------------------------------------------------------------------
def sweep(engine: Engine, site: str, clean, corrupted, metric: Metric,
          by: Sequence[str] | None = None, direction: str = "denoise", read_pos=-1,
          layers: Iterable[int] | None = None, heads: Iterable[int] | None = None,
          positions: Iterable[int] | None = None, neurons: Iterable[int] | None = None,
          memory_budget_mb: float | None = None) -> Result:
    """Patch ``site`` one index at a time, all patches batched; the metric after each.

    ``site``: one of :data:`SITES`. ``by``: the axes swept, ``("layer", "pos")`` (default) or
    ``("layer",)`` (all positions at once) for resid_*/attn_out/mlp_out; ``("layer", "head")``
    (default, all positions) or ``("layer", "head", "pos")`` for z/q/k/v/pattern (pos = the
    query position for q and pattern); ``("layer", "neuron")`` for mlp_post, patched at
    ``positions`` (default all). ``layers``/``heads``/``positions``/``neurons`` restrict the
    sweep. ``read_pos``: where the metric reads the logits (int, or one per prompt).
    ``memory_budget_mb`` bounds the patched batch held at once (default: what one ordinary
    forward of the prompts holds, and at least a quarter of the blocks' weights).
    """
    engine = engine_for(engine)  # a model or its Engine
    _check_site(site)
    by = tuple(by) if by is not None else _BY[site][0]
    if by not in _BY[site]:
        raise ValueError(f"site {site!r} is swept by one of {_BY[site]}, not {by}")
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' (clean into corrupted) or 'noise' "
                         f"(corrupted into clean), not {direction!r}")
    _check_supported(engine, site)
    n_heads = engine.n_kv_heads if site in ("k", "v") else engine.n_heads
    clean, corrupted = _pair(engine, clean, corrupted)
    N, T = clean.shape
    rp = _read_positions(read_pos, N, T, clean.device)
    ranges = {"layer": _check_range("layer", range(engine.n_layers) if layers is None else layers,
                                    engine.n_layers),
              "head": _check_range("head", range(n_heads) if heads is None else heads, n_heads,
                                   " (key-value heads: grouped-query attention)"
                                   if n_heads < engine.n_heads else ""),
              "pos": _check_range("position", range(T) if positions is None else positions, T,
                                  f" (the prompt has {T} tokens)"),
              "neuron": _check_range("neuron", range(engine.d_mlp) if neurons is None else neurons,
                                     engine.d_mlp)}
    keys = list(product(*(ranges[a] for a in by)))
    base_tok, src_tok = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    with torch.no_grad():
        probe = _make_patches(engine, site, keys, _Run(base_tok, {}, rp, None, None), {},
                              ranges["pos"])
        (src, base), lead = _runs(engine, (src_tok, base_tok), probe.want
                                  | _prefix_want(engine, probe)
                                  | _site_want(engine, site, ranges["layer"]), metric, rp,
                                  defer=True)
        patches = _make_patches(engine, site, keys, base, src.cache, ranges["pos"])
        values = _patch_core(engine, patches, base, metric,
                             _budget_mb(engine, clean, memory_budget_mb),
                             _same_before(clean, corrupted), lead)
    shape = tuple(len(ranges[a]) for a in by)
    labels = {a: [str(v) for v in ranges[a]] for a in by}
    if "pos" in by:
        all_labels = _pos_labels(engine, clean)
        labels["pos"] = [all_labels[p] for p in ranges["pos"]]
    clean_run, corr_run = (src, base) if direction == "denoise" else (base, src)
    per_prompt = values.T.reshape(N, *shape)
    return Result(f"{site} patching ({direction})", by, labels, per_prompt.mean(0), per_prompt,
                  _meta(site, direction, rp, clean_run.metric, corr_run.metric,
                        positions=ranges["pos"] if site == "mlp_post" else None))


def _budget_mb(engine: Engine, tokens: torch.Tensor, mb: float | None) -> float:
    """The default budget: what one ordinary forward of these prompts holds (full-vocab logits
    and every layer's activations, as a one-patch-per-forward sweep keeps), and at least a
    quarter of the blocks' weights (a machine that holds the model holds that much more; every
    batch reads all the weights once, and on a few short prompts that read, not the arithmetic,
    sets the time)."""
    if mb is not None:
        if mb <= 0:
            raise ValueError(f"memory_budget_mb must be positive, got {mb}")
        return mb
    N, T = tokens.shape
    per_layer = 12 * engine.d_model + 2 * engine.n_heads * T + 2 * engine.d_mlp
    size = engine.W_E.element_size() * N * T * (engine.d_vocab + engine.n_layers * per_layer)
    return max(16.0, size / 2**20, block_bytes(engine) / 4 / 2**20)


def block_bytes(engine: Engine) -> int:
    """Bytes of the blocks' matrices (QKV, O, MLP): what one pass through the layers reads."""
    qkv = (engine.n_heads + 2 * engine.n_kv_heads) * engine.d_head
    mlp = engine.d_mlp * (3 if engine.gated else 2)
    per_layer = engine.d_model * (qkv + engine.n_heads * engine.d_head + mlp)
    return engine.W_E.element_size() * engine.n_layers * per_layer


def _same_before(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading positions the two token batches share (runs agree there)."""
    diff = (a != b).any(0).nonzero()
    return int(diff[0]) if len(diff) else a.shape[1]


def _meta(site, direction, rp, clean, corrupted, **extra) -> dict:
    meta = {"site": site, "direction": direction, "read_pos": rp.tolist(),
            "clean": float(clean.float().mean()), "corrupted": float(corrupted.float().mean()),
            "clean_per_prompt": clean.float().tolist(),
            "corrupted_per_prompt": corrupted.float().tolist()}
    return {**meta, **{k: v for k, v in extra.items() if v is not None}}


def _view(site: str, by: tuple[str, ...]):
    def view(engine: Engine, clean, corrupted, metric: Metric, **kw) -> Result:
        return sweep(engine, site, clean, corrupted, metric, by=by, **kw)
    view.__name__ = f"patch_{site}" + ("_by_pos" if by[-1] == "pos" and site in HEAD_SITES
                                       else "")
    view.__doc__ = f"``sweep(engine, {site!r}, ..., by={by})``: see :func:`sweep`."
    return view


patch_resid_pre = _view("resid_pre", ("layer", "pos"))
patch_resid_mid = _view("resid_mid", ("layer", "pos"))
patch_resid_post = _view("resid_post", ("layer", "pos"))
patch_attn_out = _view("attn_out", ("layer", "pos"))
patch_mlp_out = _view("mlp_out", ("layer", "pos"))
patch_head_out = _view("z", ("layer", "head"))
patch_head_out_by_pos = _view("z", ("layer", "head", "pos"))
patch_head_q = _view("q", ("layer", "head"))
patch_head_k = _view("k", ("layer", "head"))
patch_head_v = _view("v", ("layer", "head"))
patch_head_pattern = _view("pattern", ("layer", "head"))
patch_head_q_by_pos = _view("q", ("layer", "head", "pos"))
patch_head_k_by_pos = _view("k", ("layer", "head", "pos"))
patch_head_v_by_pos = _view("v", ("layer", "head", "pos"))
patch_head_pattern_by_pos = _view("pattern", ("layer", "head", "pos"))
patch_neurons = _view("mlp_post", ("layer", "neuron"))


# -- ablations --------------------------------------------------------------------------------
def parse_component(engine: Engine, name: str | Component) -> tuple[str, tuple[int, ...]]:
    """The engine site and index of a component: ``"9.9"`` -> ("z", (9, 9)); ``"attn9"`` ->
    ("attn_out", (9,)); ``"mlp9"`` -> ("mlp_out", (9,)); ``"mlp9.1234"`` -> ("mlp_post",
    (9, 1234)). Indices are checked against the model."""
    engine = engine_for(engine)  # a model or its Engine
    c = component(name)
    if isinstance(c, Head):
        site, key, sizes = "z", (c.layer, c.head), ("head", engine.n_heads)
    elif isinstance(c, LayerOut):
        site, key, sizes = f"{c.kind}_out", (c.layer,), None
    else:
        site, key, sizes = "mlp_post", (c.layer, c.index), ("neuron", engine.d_mlp)
    _check_range("layer", key[:1], engine.n_layers, f" (in component {str(c)!r})")
    if sizes:
        _check_range(sizes[0], key[1:], sizes[1], f" (in component {str(c)!r})")
    return site, key


def ablation_values(engine: Engine, tokens: torch.Tensor, sites: Iterable[str], how: str,
                    reference=None, seed: int = 0, by_position: bool | None = None
                    ) -> dict[str, torch.Tensor]:
    """Replacement activations (TL names, shaped like ``tokens``' run) for an ablation.

    ``how="mean"`` averages over the reference prompts per position when ``by_position`` (by
    default: when they have the prompts' length), else over their prompts and positions."""
    engine = engine_for(engine)  # a model or its Engine
    sites = set(sites)
    N, T = tokens.shape
    if how == "zero":
        _, acts = engine.run(tokens, sites, logits_at=-1)
        return {s: torch.zeros_like(a) for s, a in acts.items()}
    if how not in ("mean", "resample"):
        raise ValueError(f"ablation how={how!r}: use 'zero', 'mean' or 'resample'")
    if reference is None:
        raise ValueError(f"{how} ablation needs reference=[n_ref, T] tokens to draw values from")
    reference = engine.check_tokens(reference)
    _, ref = engine.run(reference, sites, logits_at=-1)
    if how == "mean":
        if by_position is None:
            by_position = reference.shape[1] == T
        if by_position and reference.shape[1] != T:
            raise ValueError(f"a per-position mean needs reference prompts of the prompts' "
                             f"length ({T}), got {reference.shape[1]}")
        if by_position:
            return {s: a.mean(0, keepdim=True).expand(N, *a.shape[1:]) for s, a in ref.items()}
        return {s: a.mean((0, 1), keepdim=True).expand(N, T, *a.shape[2:])
                for s, a in ref.items()}
    if reference.shape[1] != T:
        raise ValueError(f"resample ablation needs reference prompts of the same length ({T}), "
                         f"got {reference.shape[1]}")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(reference), (N,), generator=gen).to(reference.device)
    return {s: a[pick] for s, a in ref.items()}


def ablate(engine: Engine, tokens, components: Sequence[str], metric: Metric,
           how: str = "zero", reference=None, together: bool = False, read_pos=-1,
           seed: int = 0, memory_budget_mb: float | None = None,
           by_position: bool | None = None) -> Result:
    """The metric with each component ablated singly (``together=False``) or all at once.

    ``how``: ``"zero"``, ``"mean"`` (over ``reference`` prompts, per position when they have the
    prompt's length, or as ``by_position`` says) or ``"resample"`` (each prompt takes a seeded
    random reference prompt's
    activation). Components: ``"9.9"`` (head z, all positions), ``"attn9"``, ``"mlp9"``,
    ``"mlp9.1234"`` (neuron). Result axis ``component``; together gives one cell labelled
    ``"9.9+9.6+..."``. ``r.clean`` is the unablated metric.
    """
    engine = engine_for(engine)  # a model or its Engine
    components, parsed = _parse_all(engine, components)
    tokens = engine.check_tokens(tokens)
    N, T = tokens.shape
    rp = _read_positions(read_pos, N, T, tokens.device)
    with torch.no_grad():
        if together:
            fns = ablation_edits(engine, tokens, components, how, reference, seed, by_position)
            logits, _ = engine.run(tokens, edits=fns)
            clean = _run(engine, tokens, (), metric, rp).metric
            out = _call_metric(metric, logits[torch.arange(N), rp], engine, tokens)[None]
            labels = ["+".join(components)]
        else:
            names = {_hook_name(s, k) for s, k in parsed}
            values = ablation_values(engine, tokens, names, how, reference, seed, by_position)
            want = set()
            groups: dict[str, list[int]] = {}
            plans = []
            for i, (site, _) in enumerate(parsed):
                groups.setdefault(site, []).append(i)
            for site, idx in groups.items():
                keys = [parsed[i][1] for i in idx]
                p = _make_patches(engine, site, keys, _Run(tokens, {}, rp, None, None), values,
                                  list(range(T)))
                want |= p.want | _prefix_want(engine, p)
                plans.append((site, idx, keys))
            base = _run(engine, tokens, want, metric, rp)
            clean = base.metric
            out = torch.empty(len(parsed), N, dtype=base.metric.dtype, device=tokens.device)
            for site, idx, keys in plans:
                p = _make_patches(engine, site, keys, base, values, list(range(T)))
                out[idx] = _patch_core(engine, p, base, metric,
                                       _budget_mb(engine, tokens, memory_budget_mb))
            labels = [str(c) for c in components]
    per_prompt = out.T
    meta = {"how": how, "together": together, "read_pos": rp.tolist(),
            "clean": float(clean.float().mean()), "clean_per_prompt": clean.float().tolist()}
    return Result(f"{how} ablation", ("component",), {"component": labels}, per_prompt.mean(0),
                  per_prompt, meta)


_ABLATE_HOOK = {"z": "attn.hook_z", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
                "mlp_post": "mlp.hook_post"}


def _parse_all(engine: Engine, components) -> tuple[list[str], list[tuple[str, tuple]]]:
    """The component names as a list, and each one's (site, key); at least one."""
    names = [components] if isinstance(components, str) else list(components)
    if not names:
        raise ValueError("an ablation needs at least one component")
    return names, [parse_component(engine, c) for c in names]


def _hook_name(site: str, key: tuple[int, ...]) -> str:
    return f"blocks.{key[0]}.{_ABLATE_HOOK[site]}"


def ablation_edits(engine: Engine, tokens, components: Sequence[str], how: str = "zero",
                   reference=None, seed: int = 0, by_position: bool | None = None
                   ) -> dict[str, Edit]:
    """Engine edits (``Engine.run(..., edits=...)``) that ablate ``components`` together, at
    every position: ``"9.9"``, ``"attn9"``, ``"mlp9"``, ``"mlp9.1234"``; ``how`` as in
    :func:`ablate`."""
    engine = engine_for(engine)
    _, parsed = _parse_all(engine, components)
    tokens = engine.check_tokens(tokens)
    values = ablation_values(engine, tokens, {_hook_name(s, k) for s, k in parsed}, how,
                             reference, seed, by_position)
    idxs: dict[str, list[tuple]] = {}
    for site, key in parsed:
        idxs.setdefault(_hook_name(site, key), []).append((slice(None), slice(None)) + key[1:])
    return {n: _replace(values[n], i) for n, i in idxs.items()}


def _replace(value: torch.Tensor, idxs: list[tuple]):
    def edit(act: torch.Tensor) -> torch.Tensor:
        act = act.clone()
        for idx in idxs:
            act[idx] = value[idx]
        return act
    return edit


# -- additions to the residual stream (steering) ---------------------------------------------
def resid_interventions(engine: Engine, tokens, site: str, layer: int, deltas: torch.Tensor,
                        metric: Metric, read_pos=-1, memory_budget_mb: float | None = None
                        ) -> torch.Tensor:
    """The metric after adding each of ``deltas`` ``[K, n_prompts, T, d_model]`` to the
    residual stream at ``site`` (resid_pre/mid/post) of ``layer``: ``[K, n_prompts]``.

    Each addition is one patch of the core (batched, from its first non-zero position on)."""
    engine = engine_for(engine)
    if site not in ("resid_pre", "resid_mid", "resid_post"):
        raise ValueError(f"site={site!r}: choose resid_pre, resid_mid or resid_post")
    _check_supported(engine, site)
    layer = _check_range("layer", [layer], engine.n_layers)[0]
    tokens = engine.check_tokens(tokens)
    N, T = tokens.shape
    if deltas.dim() != 4 or tuple(deltas.shape[1:]) != (N, T, engine.d_model):
        raise ValueError(f"deltas must have shape [K, {N}, {T}, {engine.d_model}], got "
                         f"{tuple(deltas.shape)}")
    rp = _read_positions(read_pos, N, T, tokens.device)
    deltas = deltas.to(engine.device, engine.dtype)
    nz = deltas.abs().amax((0, 1, 3)).nonzero()
    span = (int(nz[0]), int(nz[-1])) if len(nz) else (T - 1, T - 1)
    stage = 2 * layer + RESID_SITES[site][1]
    keys = [(k,) for k in range(deltas.shape[0])]
    patches = _Patches(keys, lambda k: stage, lambda k: span,
                       lambda ks, p0: deltas[[k[0] for k in ks]].transpose(0, 1)[:, :, p0:],
                       {_stage_name(engine, stage)})
    with torch.no_grad():
        (base,), lead = _runs(engine, (tokens,), patches.want | _prefix_want(engine, patches),
                              metric, rp, defer=True)
        return _patch_core(engine, patches, base, metric,
                           _budget_mb(engine, tokens, memory_budget_mb), lead=lead)


# -- path patching ----------------------------------------------------------------------------
def path_patch(engine: Engine, clean, corrupted, metric: Metric, receivers: Sequence[str],
               component: str = "q", direction: str = "denoise", read_pos=-1,
               memory_budget_mb: float | None = None) -> Result:
    """Each sender head's effect through the receivers' queries, keys or values only.

    For every sender head S (all heads; result axes ``layer``, ``head``) the base run is
    repeated with S's source-minus-base write ``(z_src - z_base) @ W_O`` added to the
    ``component`` input (pre-LayerNorm residual) of each receiver head in a later layer, and to
    nothing else: the direct path S -> receivers (Wang et al. 2022). With one receiver this is
    TransformerLens's ``get_act_patch_direct_path``. Senders at or after every receiver's layer
    leave the metric at the base value.
    """
    engine = engine_for(engine)  # a model or its Engine
    if component not in ("q", "k", "v"):
        raise ValueError(f"path_patch component must be 'q', 'k' or 'v', not {component!r}")
    _check_supported(engine, component, "path patching")
    if isinstance(receivers, str):
        receivers = [receivers]
    recv = []
    for r in receivers:
        site, key = parse_component(engine, r)
        if site != "z":
            raise ValueError(f"receiver {r!r} is not a head: name receivers 'L.H', e.g. '9.9'")
        recv.append(key)
    if not recv:
        raise ValueError("path_patch needs at least one receiver head")
    clean, corrupted = _pair(engine, clean, corrupted)
    N, T = clean.shape
    rp = _read_positions(read_pos, N, T, clean.device)
    base_tok, src_tok = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    L, H = engine.n_layers, engine.n_heads
    first, last = min(k[0] for k in recv), max(k[0] for k in recv)
    zs = [f"blocks.{lay}.attn.hook_z" for lay in range(last)]
    with torch.no_grad():
        src, base = _runs(engine, (src_tok, base_tok), zs + [f"blocks.{first}.hook_resid_pre"],
                          metric, rp)
        senders = [(lay, h) for lay in range(last) for h in range(H)]
        out = base.metric[None].repeat(L * H, 1)
        per_patch = engine.W_E.element_size() * N * T * (
            12 * engine.d_model + 4 * H * T + 3 * engine.d_mlp)
        chunk = max(1, int(_budget_mb(engine, clean, memory_budget_mb) * 2**20 // per_patch))
        for c in range(0, len(senders), chunk):
            part = senders[c:c + chunk]
            P = len(part)
            write = torch.stack([_sender_write(engine, lay, h, src.cache[zs[lay]],
                                               base.cache[zs[lay]]) for lay, h in part], 1)
            s_layer = torch.tensor([lay for lay, _ in part], device=clean.device)
            edits, cache = {}, {}  # the receivers' edits read their inputs from this run's cache
            for rl in sorted({k[0] for k in recv}):
                heads = [k[1] for k in recv if k[0] == rl]
                mask = (s_layer < rl).to(write.dtype)[None, :, None, None]
                edits[f"blocks.{rl}.attn.hook_{component}"] = _path_edit(
                    engine, rl, heads, write * mask, component, cache)
            ctx = Ctx({f"blocks.{k[0]}.hook_resid_pre" for k in recv}, edits, cache)
            x0 = base.cache[f"blocks.{first}.hook_resid_pre"][:, None].expand(N, P, T, -1)
            x = engine.forward(x0, 2 * first, ctx=ctx, read=rp)[:, :, 0]
            vals = _score(engine, metric, x.transpose(0, 1), base_tok,
                          [f"sender {lay}.{h}" for lay, h in part])
            out[[lay * H + h for lay, h in part]] = vals
    per_prompt = out.T.reshape(N, L, H)
    clean_run, corr_run = (src, base) if direction == "denoise" else (base, src)
    return Result(f"path patching -> {','.join(receivers)} ({component})", ("layer", "head"),
                  {"layer": [str(i) for i in range(L)], "head": [str(i) for i in range(H)]},
                  per_prompt.mean(0), per_prompt,
                  {**_meta("path", direction, rp, clean_run.metric, corr_run.metric),
                   "receivers": list(receivers), "component": component})


def _sender_write(engine: Engine, layer: int, head: int, z_src: torch.Tensor,
                  z_base: torch.Tensor) -> torch.Tensor:
    """What a sender head's source-minus-base output changes in the residual stream
    ``[N,T,d]``: ``(z_src - z_base) @ W_O``, through the layer's post-norm where it has one."""
    change = torch.einsum("nte,ed->ntd", z_src[:, :, head] - z_base[:, :, head],
                          engine.W_O_raw[layer, head])
    if engine.post_norms is None:
        return change
    return engine.post_delta(layer, 0, engine.branch_sum(layer, 0, z_base), change)


def _path_edit(engine: Engine, layer: int, heads: list[int], write: torch.Tensor,
               component: str, cache: dict[str, torch.Tensor]):
    """Recompute the receivers' q/k/v from their own residual input plus the sender write
    (through the q/k norm where the model has one); ``cache`` is the forward's (its
    ``Ctx.cache``), which holds that input by then."""
    W = {"q": engine.W_Q, "k": engine.W_K, "v": engine.W_V}[component]
    b = {"q": engine.b_Q, "k": engine.b_K, "v": engine.b_V}[component]

    def edit(act: torch.Tensor) -> torch.Tensor:  # act [N*P, T, H, dh]
        x = cache[f"blocks.{layer}.hook_resid_pre"]  # [N*P, T, d]
        x = engine.normalize(x + write.reshape(x.shape))
        act = act.clone()
        for h in heads:
            new = x @ W[layer, h] + b[layer, h]
            act[:, :, h] = new if component == "v" else engine.qk_norm(layer, component, new)
        return act
    return edit


# -- attribution patching ---------------------------------------------------------------------
# Up to this many rows the source run joins the gradient run (measured on GPT-2 small's shape:
# 11 tokens x 1 prompt 0.30 -> 0.21 s; 11 x 8 and 64 x 1 slower together).
ATTRIBUTION_SHARED_ROWS = 48


def attribution_patches(engine: Engine, sites: Iterable[str | tuple[str, Sequence[str]]], clean,
                        corrupted, metric: Metric, direction: str = "denoise", read_pos=-1,
                        positions: Iterable[int] | None = None) -> dict[str, Result]:
    """Attribution patching (first-order Taylor) for several sites from one backward pass.

    ``sites``: names, or ``(site, by)`` pairs; the key of the returned dict is the site name
    (plus ``":" + "/".join(by)`` for a pair). Each cell estimates what :func:`sweep` gives
    minus the base metric: ``(a_src - a_base) . d metric / d a`` at the base run, summed over
    the swept cell (d_model; d_head and positions for heads over all positions; source
    positions for pattern; ``positions`` for neurons).
    """
    engine = engine_for(engine)  # a model or its Engine
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    specs = []
    for s in sites:
        site, by = (s, None) if isinstance(s, str) else (s[0], tuple(s[1]))
        _check_site(site)
        by = by or _BY[site][0]
        if by not in _BY[site]:
            raise ValueError(f"site {site!r} is swept by one of {_BY[site]}, not {by}")
        specs.append((site if isinstance(s, str) else f"{site}:{'/'.join(by)}", site, by))
    clean, corrupted = _pair(engine, clean, corrupted)
    N, T = clean.shape
    rp = _read_positions(read_pos, N, T, clean.device)
    pos = _check_range("position", range(T) if positions is None else positions, T,
                       f" (the prompt has {T} tokens)")
    hooks = {**{s: h for s, (h, _) in RESID_SITES.items()}, **HEAD_SITES, **NEURON_SITES}
    want = {f"blocks.{lay}.{hooks[site]}" for _, site, _ in specs
            for lay in range(engine.n_layers)}
    base_tok, src_tok = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    # Few rows (short prompts, few of them): the matmuls are bound by reading the weights, so
    # the source run rides in the gradient run's batch (its rows get a gradient nobody reads);
    # more rows: a separate no-grad run, so the backward does not carry them.
    together = 2 * N * T <= ATTRIBUTION_SHARED_ROWS
    if not together:
        with torch.no_grad():
            src = _run(engine, src_tok, want, metric, rp)
    with torch.enable_grad():
        def keep(a: torch.Tensor) -> torch.Tensor:
            a.retain_grad()
            return a
        ctx = Ctx(want, {n: keep for n in want})
        toks = torch.cat([base_tok, src_tok]) if together else base_tok
        x0 = engine.embed(toks).detach().requires_grad_(True)
        x = engine.forward(x0, 0, ctx=ctx)[:, 0]
        final = x[torch.arange(len(toks), device=x.device), rp.repeat(len(toks) // N)]
        m = _score(engine, metric, final[:N], base_tok)
        m.sum().backward()
    if together:
        src = _Run(src_tok, {n: a[N:].detach() for n, a in ctx.cache.items()}, rp,
                   final[N:].detach(), _score(engine, metric, final[N:].detach(), src_tok))
    out = {}
    for key, site, by in specs:
        names = [f"blocks.{lay}.{hooks[site]}" for lay in range(engine.n_layers)]
        prod = torch.stack([(src.cache[n] - ctx.cache[n][:N].detach()) * ctx.cache[n].grad[:N]
                            for n in names], 1)  # [N, L, ...TL shape]
        if site in RESID_SITES:  # [N,L,T,d]
            vals = prod.sum(-1) if by == ("layer", "pos") else prod.sum((-1, -2))
        elif site == "pattern":  # [N,L,H,q,k]
            vals = prod.sum(-1) if by[-1] == "pos" else prod.sum((-1, -2))
        elif site in HEAD_SITES:  # [N,L,T,H,dh] -> [N,L,H,(T)]
            vals = prod.sum(-1).transpose(-1, -2)
            vals = vals if by[-1] == "pos" else vals.sum(-1)
        else:  # [N,L,T,d_mlp]
            vals = prod[:, :, pos].sum(2)
        labels = {"layer": [str(i) for i in range(engine.n_layers)],
                  "head": [str(i) for i in range(vals.shape[2] if site in HEAD_SITES else 0)],
                  "pos": _pos_labels(engine, clean),
                  "neuron": [str(i) for i in range(engine.d_mlp)]}
        vals = vals.detach()
        out[key] = Result(f"{site} attribution ({direction})", by, {a: labels[a] for a in by},
                          vals.mean(0), vals,
                          {**_meta(site, direction, rp, *(
                              (src.metric, m.detach()) if direction == "denoise"
                              else (m.detach(), src.metric))), "method": "attribution"})
    return out


def attribution_patch(engine: Engine, site: str, clean, corrupted, metric: Metric,
                      by: Sequence[str] | None = None, **kw) -> Result:
    """Attribution patching of one site: see :func:`attribution_patches`."""
    engine = engine_for(engine)  # a model or its Engine
    _check_site(site)
    return next(iter(attribution_patches(engine, [(site, by or _BY[site][0])], clean, corrupted,
                                         metric, **kw).values()))


def rank_correlation(approx: Result, exact: Result) -> float:
    """Spearman rank correlation between two results' values (e.g. attribution vs a sweep).

    An attribution estimates ``exact - base``; ranks are unchanged by that shift.
    """
    a, b = approx.values.flatten().double(), exact.values.flatten().double()
    if a.shape != b.shape:
        raise ValueError(f"results have {a.numel()} and {b.numel()} cells: compare the same "
                         "site and axes")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    uniq, inv = torch.unique(x, return_inverse=True)
    if len(uniq) < len(x):
        sums = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inv, ranks)
        ranks = (sums / torch.bincount(inv, minlength=len(uniq)).to(x.dtype))[inv]
    return ranks
