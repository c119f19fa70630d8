"""Direct logit attribution, logit lens, neuron and steering views of one cached run.

Everything reads the residual stream the way TransformerLens does in compatibility mode
(LayerNorm folded, writing weights and unembedding centred): a component's direct effect on a
logit difference is ``(x - mean(x)) . (W_U[:, answer] - W_U[:, counterfactual]) / scale`` with
``scale`` the cached ``ln_final.hook_scale`` at the read position (TL's ``apply_ln_to_stack``).
Components plus the unembedding bias sum to the actual logit difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mechtests.analysis._common import (
    Pos,
    Tokens,
    _at,
    _check_layer,
    _engine,
    _labels,
    _positions,
    _run,
    _tokens,
    _w,
)
from mechtests.analysis.patching import ablate, resid_interventions
from mechtests.core.engine import centre_and_scale
from mechtests.core.result import Result
from mechtests.core.sites import Neuron


def _compat(model: Any) -> None:
    """The folded weights are there: the bridge's in compatibility mode, or the engine's."""
    if getattr(model, "compatibility_mode", False):
        return
    if hasattr(model, "parameters") and _engine(model) is not None:
        return
    raise ValueError("this attribution reads folded weights (W_U, W_O, W_out): load the model "
                     "with load_model(..., compat=True) or call "
                     "model.enable_compatibility_mode() first")


def _rms(model: Any) -> bool:
    """RMSNorm reads the residual without centring it."""
    eng = _engine(model)
    return bool(eng is not None and eng.rms)


def _eps(model: Any) -> float:
    eng = _engine(model)
    return eng.eps if eng is not None else model.cfg.eps


def logit_direction(model: Any, answer_ids: torch.Tensor,
                    counterfactual_ids: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt unembedding direction and bias: ``W_U[:, a] - W_U[:, c]``, ``b_U[a] - b_U[c]``.

    Under LayerNorm the direction is mean-centred over d_model, which is the same as centring
    the residual stream before it is read; RMSNorm does not centre, so neither does the
    direction. Without counterfactuals it is the answer logit itself.
    """
    _compat(model)
    w_u, b_u = _w(model, "W_U"), _w(model, "b_U")
    a = torch.as_tensor(answer_ids, device=w_u.device).long().flatten()
    d, b = w_u[:, a].T, b_u[a]
    if counterfactual_ids is not None:
        c = torch.as_tensor(counterfactual_ids, device=w_u.device).long().flatten()
        if c.shape != a.shape:
            raise ValueError(f"answer_ids {tuple(a.shape)} and counterfactual_ids "
                             f"{tuple(c.shape)} must have one id per prompt")
        d, b = d - w_u[:, c].T, b - b_u[c]
    return (d if _rms(model) else d - d.mean(-1, keepdim=True)), b


def _direction_setup(model, tokens, answer_ids, counterfactual_ids, pos):
    toks = _tokens(model, tokens)
    p = _positions(pos, toks)
    d, b = logit_direction(model, answer_ids, counterfactual_ids)
    if d.shape[0] != toks.shape[0]:
        raise ValueError(f"{d.shape[0]} answer ids for {toks.shape[0]} prompts; give one per "
                         f"prompt")
    return toks, p, d, b


def _metric_meta(logits, p, d_bias, answer_ids, counterfactual_ids) -> dict[str, Any]:
    lg = _at(logits, p)
    a = torch.as_tensor(answer_ids, device=lg.device).long().flatten()
    m = lg.gather(-1, a[:, None])[:, 0]
    if counterfactual_ids is not None:
        c = torch.as_tensor(counterfactual_ids, device=lg.device).long().flatten()
        m = m - lg.gather(-1, c[:, None])[:, 0]
    return {"pos": p.tolist(), "metric": m.tolist(), "b_U": d_bias.tolist()}


# -- 1. direct logit attribution ---------------------------------------------------------------
def logit_attribution(model: Any, tokens: Tokens, answer_ids: torch.Tensor,
                      counterfactual_ids: torch.Tensor | None = None, pos: Pos = None) -> Result:
    """Direct effect of each residual component (embed, pos_embed, attn_L, mlp_L) on the metric.

    Axis ``component``; per_prompt has one row per prompt. ``meta['metric']`` is the actual
    per-prompt logit difference, equal to the components' sum plus ``meta['b_U']``.
    """
    toks, p, d, bias = _direction_setup(model, tokens, answer_ids, counterfactual_ids, pos)
    n_layers = model.cfg.n_layers
    names, sites = ["embed", "pos_embed"], ["hook_embed", "hook_pos_embed"]
    eng = _engine(model)
    if eng is not None and eng.W_pos is None:  # rotary models: no positional embedding
        names, sites = names[:1], sites[:1]
    for layer in range(n_layers):
        names += [f"attn_{layer}", f"mlp_{layer}"]
        sites += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    logits, acts = _run(model, toks, [*sites, "ln_final.hook_scale"])
    scale = _at(acts["ln_final.hook_scale"], p)[:, 0]                          # [n]
    stack = torch.stack([_at(acts[s], p) for s in sites], 1)                   # [n, C, d]
    per = torch.einsum("ncd,nd->nc", stack, d) / scale[:, None]
    return Result("direct logit attribution", ("component",), {"component": names},
                  per.mean(0), per, _metric_meta(logits, p, bias, answer_ids, counterfactual_ids))


def _per_layer_direction(model: Any, which: int, inner: torch.Tensor,
                         d: torch.Tensor) -> torch.Tensor:
    """``[n, L, d_model]``: the logit direction each layer's heads (``which`` 0, ``inner`` the
    read position's z ``[n, L, H, dh]``) or neurons (1, post ``[n, L, m]``) write along.
    ``d`` itself, unless a norm follows attention or the MLP (Gemma 3): then ``d`` times the
    factor that norm applied to its input in this run (``Engine.post_scale``), so each head or
    neuron gets its share of what the layer added and the shares (plus the bias's) sum to the
    layer's attribution exactly, the frozen-scale reading DLA already takes for the final
    norm."""
    eng = _engine(model)
    L = inner.shape[1]
    if eng is None or eng.post_norms is None:
        return d[:, None].expand(-1, L, -1)
    return torch.stack([d * eng.post_scale(la, which, eng.branch_sum(la, which, inner[:, la]))
                        .to(d.dtype) for la in range(L)], 1)


def _raw(model: Any, name: str) -> torch.Tensor:
    """``W_O`` / ``W_out`` into the branch's sum, before any norm after it (the engine's
    ``W_O_raw`` / ``W_out_raw``; a model without an engine has no such norm)."""
    eng = _engine(model)
    return (getattr(eng, f"{name}_raw") if eng is not None else getattr(model, name)).detach()


def head_attribution(model: Any, tokens: Tokens, answer_ids: torch.Tensor,
                     counterfactual_ids: torch.Tensor | None = None, pos: Pos = None) -> Result:
    """Direct effect of each head (``z @ W_O`` at the read position) on the metric.

    Axes ``("layer", "head")``. ``meta['b_O']`` is each layer's output-bias term (per prompt),
    so heads of layer L plus ``b_O[L]`` give that layer's ``attn_L`` attribution. Where a norm
    follows attention (Gemma 3), each head's ``z @ W_O`` is taken through the factor that norm
    applied in this run (see ``_per_layer_direction``): its share of ``attn_L``, not what the
    layer would write without the head (that is ``patching.ablate``).
    """
    toks, p, d, bias = _direction_setup(model, tokens, answer_ids, counterfactual_ids, pos)
    n_layers = model.cfg.n_layers
    sites = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    logits, acts = _run(model, toks, [*sites, "ln_final.hook_scale"])
    scale = _at(acts["ln_final.hook_scale"], p)[:, 0]
    z = torch.stack([_at(acts[s], p) for s in sites], 1)                       # [n, L, H, dh]
    dl = _per_layer_direction(model, 0, z, d)                                  # [n, L, d]
    per = torch.einsum("nlhe,lhed,nld->nlh", z, _raw(model, "W_O"), dl) / scale[:, None, None]
    meta = _metric_meta(logits, p, bias, answer_ids, counterfactual_ids)
    meta["b_O"] = (torch.einsum("ld,nld->nl", _w(model, "b_O"), dl) / scale[:, None]).tolist()
    labels = {"layer": _labels(n_layers), "head": _labels(model.cfg.n_heads)}
    return Result("head direct logit attribution", ("layer", "head"), labels, per.mean(0), per,
                  meta)


def neuron_attribution(model: Any, tokens: Tokens, answer_ids: torch.Tensor,
                       counterfactual_ids: torch.Tensor | None = None, pos: Pos = None) -> Result:
    """Direct effect of each MLP neuron (``post * W_out[n]`` at the read position) on the metric.

    Axes ``("layer", "neuron")``. ``meta['b_out']`` holds each layer's bias term (per prompt).
    Where a norm follows the MLP (Gemma 3), each neuron's share of ``mlp_L``, as for heads in
    :func:`head_attribution`.
    """
    toks, p, d, bias = _direction_setup(model, tokens, answer_ids, counterfactual_ids, pos)
    n_layers = model.cfg.n_layers
    sites = [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
    logits, acts = _run(model, toks, [*sites, "ln_final.hook_scale"])
    scale = _at(acts["ln_final.hook_scale"], p)[:, 0]
    post = torch.stack([_at(acts[s], p) for s in sites], 1)                    # [n, L, m]
    dl = _per_layer_direction(model, 1, post, d)                               # [n, L, d]
    per = post * torch.einsum("lmd,nld->nlm", _raw(model, "W_out"), dl) / scale[:, None, None]
    meta = _metric_meta(logits, p, bias, answer_ids, counterfactual_ids)
    meta["b_out"] = (torch.einsum("ld,nld->nl", _w(model, "b_out"), dl)
                     / scale[:, None]).tolist()
    labels = {"layer": _labels(n_layers), "neuron": _labels(post.shape[-1])}
    return Result("neuron direct logit attribution", ("layer", "neuron"), labels, per.mean(0),
                  per, meta)


# -- 2. logit lens -----------------------------------------------------------------------------
def _resid_sites(n_layers: int, incl_mid: bool) -> tuple[list[str], list[str]]:
    """TL ``accumulated_resid`` labels (``0_pre``, ``0_mid``, ..., ``final_post``) and sites."""
    labels, sites = [], []
    for layer in range(n_layers):
        labels.append(f"{layer}_pre")
        sites.append(f"blocks.{layer}.hook_resid_pre")
        if incl_mid:
            labels.append(f"{layer}_mid")
            sites.append(f"blocks.{layer}.hook_resid_mid")
    labels.append("final_post")
    sites.append(f"blocks.{n_layers - 1}.hook_resid_post")
    return labels, sites


def logit_lens(model: Any, tokens: Tokens, answer_ids: torch.Tensor,
               counterfactual_ids: torch.Tensor | None = None, pos: Pos = None,
               incl_mid: bool = True, recompute_ln: bool = True) -> Result:
    """The metric read off the accumulated residual stream after each layer (axis ``layer``).

    Each stream goes through the final LayerNorm and is projected on the logit direction, plus
    the unembedding bias, so ``final_post`` equals the actual metric. ``recompute_ln=True`` (TL
    4.x ``accumulated_resid(apply_ln=True)``) normalises each stream by its own scale;
    ``False`` divides all by the full run's cached final scale (TL 2/3 ``apply_ln_to_stack``),
    which keeps the entries linear in the stream. Models with parallel attention and MLP
    (GPT-J, most Pythia) have no ``_mid`` entries.
    """
    toks, p, d, bias = _direction_setup(model, tokens, answer_ids, counterfactual_ids, pos)
    eng = _engine(model)
    if eng is not None and eng.parallel:  # parallel blocks have no resid_mid
        incl_mid = False
    labels, sites = _resid_sites(model.cfg.n_layers, incl_mid)
    logits, acts = _run(model, toks, [*sites, "ln_final.hook_scale"])
    x = torch.stack([_at(acts[s], p) for s in sites], 1)                       # [n, S, d]
    x, scale = centre_and_scale(x, _eps(model), _rms(model))                   # [n, S, 1]
    if recompute_ln:
        scale = scale[..., 0]                                                  # [n, S]
    else:
        scale = _at(acts["ln_final.hook_scale"], p)[:, 0, None]                # [n, 1]
    per = torch.einsum("nsd,nd->ns", x, d) / scale + bias[:, None]
    meta = _metric_meta(logits, p, bias, answer_ids, counterfactual_ids)
    meta["recompute_ln"] = recompute_ln
    return Result("logit lens", ("layer",), {"layer": labels}, per.mean(0), per, meta)


# -- 4. entropy / confidence-regulation neurons -----------------------------------------------
def _neuron_rows(model: Any) -> torch.Tensor:
    """``[L, d_mlp, d_model]``: what each neuron writes per unit of activation: its row of
    ``W_out``; where a norm follows the MLP (Gemma 3) the row times that norm's gain, which
    leaves out only the ``1 / rms`` the norm divides the whole MLP output by (one number per
    layer and position, the same for every neuron of the layer), so norms compare neurons
    within a layer and directions are exact."""
    _compat(model)
    eng = _engine(model)
    if eng is None or eng.post_norms is None:
        return _w(model, "W_out")
    return eng.W_out_raw * eng.post_norms[1][:, None].to(eng.W_out_raw.dtype)


def neuron_output_norms(model: Any) -> Result:
    """L2 norm of every neuron's output weights (rows of ``W_out``), axes ``(layer, neuron)``.

    Where a norm follows the MLP, the rows times its gain (``_neuron_rows``): compare neurons
    within a layer there, not across layers (each layer's norm divides by its own RMS)."""
    w = _neuron_rows(model)
    return Result("neuron output norm", ("layer", "neuron"),
                  {"layer": _labels(w.shape[0]), "neuron": _labels(w.shape[1])}, w.norm(dim=-1))


def unembed_null_space(model: Any, k: int | None = None) -> torch.Tensor:
    """The ``k`` residual directions the unembedding reads least: [d_model, k], orthonormal.

    Bottom-k left singular vectors of ``W_U`` within the mean-zero subspace (the all-ones
    direction is removed by LayerNorm, so it is excluded rather than counted as 'null').
    Default ``k = ceil(2% of d_model)`` (16 for GPT-2 small's 768), the scale of the effective
    null space that confidence-regulation neurons write to (Stolfo et al. 2024).
    """
    _compat(model)
    w_u = _w(model, "W_U").float()
    d_model = w_u.shape[0]
    k = max(1, math.ceil(0.02 * d_model)) if k is None else k
    if not 1 <= k < d_model:
        raise ValueError(f"k={k}: choose 1 <= k < d_model={d_model}")
    if _rms(model):  # RMSNorm keeps the all-ones direction: nothing to exclude
        u, _, _ = torch.linalg.svd(w_u, full_matrices=False)
        return u[:, -k:]
    ones = torch.full((d_model, 1), d_model ** -0.5, device=w_u.device)
    # orthonormal basis of the complement of the all-ones direction
    basis = torch.linalg.qr(torch.cat([ones, torch.eye(d_model, device=w_u.device)], 1))[0]
    comp = basis[:, 1:d_model]                                                 # [d, d-1]
    u, _, _ = torch.linalg.svd(comp.T @ w_u, full_matrices=False)              # descending
    return comp @ u[:, -k:]


def unembed_null_fraction(model: Any, k: int | None = None) -> Result:
    """Fraction of each neuron's output norm² that lies in the unembedding's null space.

    Axes ``(layer, neuron)``; 1 means the neuron writes only where ``W_U`` cannot read (a
    candidate entropy neuron acting through the final LayerNorm scale). See
    ``unembed_null_space`` for ``k``.
    """
    null = unembed_null_space(model, k)
    w = _neuron_rows(model).float()
    if not _rms(model):
        w = w - w.mean(-1, keepdim=True)
    frac = (w @ null).pow(2).sum(-1) / w.pow(2).sum(-1).clamp_min(1e-30)
    return Result("unembed null-space fraction", ("layer", "neuron"),
                  {"layer": _labels(w.shape[0]), "neuron": _labels(w.shape[1])}, frac,
                  meta={"k": null.shape[1]})


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    lp = logits.float().log_softmax(-1)
    return -(lp.exp() * lp).sum(-1)


def neuron_ablation_effect(model: Any, tokens: Tokens, layer: int, neurons: Sequence[int],
                           how: str = "zero", pos: Pos = None) -> Result:
    """Change in next-token entropy and in the clean top token's logit when a neuron is ablated.

    Each neuron is ablated alone, at every position, to zero or to its mean activation over all
    prompts and positions of ``tokens``; effects (ablated - clean) are read at ``pos``. Axes
    ``("neuron", "measure")`` with measures ``entropy`` and ``top_logit``. Runs through the
    patching core (``patching.ablate``), all neurons batched.
    """
    if how not in ("zero", "mean"):
        raise ValueError(f"how={how!r}: choose 'zero' or 'mean'")
    toks = _tokens(model, tokens)
    p = _positions(pos, toks)
    layer = _check_layer(model, layer)
    idx = torch.as_tensor(list(neurons), dtype=torch.long)
    d_mlp = model.cfg.d_mlp
    if idx.numel() == 0 or (idx < 0).any() or (idx >= d_mlp).any():
        raise ValueError(f"neurons {idx.tolist()}: give at least one, each in 0..{d_mlp - 1}")
    top = _at(_run(model, toks, [])[0], p).argmax(-1)                          # [n]
    comps = [str(Neuron(layer, j)) for j in idx.tolist()]

    def top_logit(lg: torch.Tensor) -> torch.Tensor:
        return lg.gather(-1, top.expand(lg.shape[:-1])[..., None])[..., 0]

    per = []
    for metric in (_entropy, top_logit):
        r = ablate(model, toks, comps, metric, how=how, reference=toks, read_pos=p,
                   by_position=False)
        per.append(r.per_prompt - r.clean_per_prompt[:, None])                # [n, K]
    per = torch.stack(per, -1)                                                 # [n, K, 2]
    labels = {"neuron": [f"{layer}.{j}" for j in idx.tolist()],
              "measure": ["entropy", "top_logit"]}
    return Result(f"neuron {how}-ablation effect", ("neuron", "measure"), labels, per.mean(0),
                  per, {"layer": layer, "how": how, "pos": p.tolist()})


# -- 5. steering and directions ----------------------------------------------------------------
_RESID = ("resid_pre", "resid_mid", "resid_post")


def _resid_site(model: Any, layer: int, site: str) -> str:
    if site not in _RESID:
        raise ValueError(f"site={site!r}: choose one of {', '.join(_RESID)}")
    return f"blocks.{_check_layer(model, layer)}.hook_{site}"


def _resid_at(model: Any, tokens: Tokens, layer: int, pos: Pos, site: str) -> torch.Tensor:
    toks = _tokens(model, tokens)
    p = _positions(pos, toks)
    name = _resid_site(model, layer, site)
    return _at(_run(model, toks, [name])[1][name], p)


def mean_difference_direction(model: Any, tokens_a: Tokens, tokens_b: Tokens, layer: int,
                              pos_a: Pos = None, pos_b: Pos = None, site: str = "resid_pre",
                              normalize: bool = False) -> torch.Tensor:
    """mean(resid | set A) - mean(resid | set B) at ``layer``/``site`` and each set's position.

    Returns a [d_model] tensor (unit norm when ``normalize``): the difference-of-means steering
    direction, e.g. 'she' prompts minus 'he' prompts.
    """
    diff = (_resid_at(model, tokens_a, layer, pos_a, site).mean(0)
            - _resid_at(model, tokens_b, layer, pos_b, site).mean(0))
    return diff / diff.norm().clamp_min(1e-30) if normalize else diff


def steering_sweep(model: Any, tokens: Tokens, direction: torch.Tensor, layer: int,
                   alphas: Sequence[float], metric: Callable[[torch.Tensor], torch.Tensor],
                   pos: Pos = None, site: str = "resid_pre", steer_pos: Pos | str = "all"
                   ) -> Result:
    """The metric at ``pos`` after adding ``alpha * direction`` to the residual stream.

    ``metric`` maps logits ``(n_alphas, n_prompts, d_vocab)`` to ``(n_alphas, n_prompts)``.
    The direction is added at ``layer``/``site``, at every position (``steer_pos='all'``) or one
    per prompt. All alphas run in one batched forward. Axis ``alpha``; ``meta`` has the
    least-squares ``slope`` and ``r2`` of the mean metric against alpha.
    """
    toks = _tokens(model, tokens)
    p = _positions(pos, toks)
    _resid_site(model, layer, site)  # checks the site and the layer
    n, t = toks.shape
    a = torch.as_tensor(list(alphas), dtype=torch.float32, device=toks.device)
    direction = torch.as_tensor(direction, dtype=torch.float32, device=toks.device).flatten()
    if direction.numel() != model.cfg.d_model:
        raise ValueError(f"direction has {direction.numel()} entries; it must have d_model="
                         f"{model.cfg.d_model}")
    where = torch.ones(n, t, device=toks.device)
    if not (isinstance(steer_pos, str) and steer_pos == "all"):
        sp = _positions(steer_pos, toks, "steer_pos")
        where = torch.zeros(n, t, device=toks.device)
        where[torch.arange(n), sp] = 1.0
    add = a[:, None, None, None] * where[None, :, :, None] * direction         # [k, n, t, d]
    per = resid_interventions(model, toks, site, layer, add, metric, read_pos=p).T  # [n, k]
    mean = per.mean(0)
    ac = a.cpu() - a.cpu().mean()
    mc = mean - mean.mean()
    slope = float((ac * mc).sum() / (ac.pow(2).sum() or 1.0))
    ss = float(mc.pow(2).sum())
    r2 = 1.0 - float((mc - slope * ac).pow(2).sum()) / ss if ss > 0 else 1.0
    return Result("steering sweep", ("alpha",), {"alpha": [f"{x:g}" for x in a.tolist()]}, mean,
                  per, {"layer": layer, "site": site, "slope": slope, "r2": r2})


def separating_neurons(model: Any, tokens_a: Tokens, tokens_b: Tokens, layer: int | None = None,
                       pos_a: Pos = None, pos_b: Pos = None) -> Result:
    """How well each MLP neuron separates two prompt sets: (mean_A - mean_B) / pooled std.

    Activations (``mlp.hook_post``) are read at each set's position; the pooled std is
    ``sqrt((var_A + var_B) / 2)`` (population variances). Axes ``(layer, neuron)``; one layer
    when ``layer`` is given. Use ``top_k`` for the most A-selective neurons.
    """
    layers = list(range(model.cfg.n_layers)) if layer is None else [_check_layer(model, layer)]
    sites = [f"blocks.{lay}.mlp.hook_post" for lay in layers]

    def acts(tokens: Tokens, pos: Pos) -> torch.Tensor:
        toks = _tokens(model, tokens)
        p = _positions(pos, toks)
        cache = _run(model, toks, sites)[1]
        return torch.stack([_at(cache[s], p) for s in sites], 1)               # [n, L, m]

    xa, xb = acts(tokens_a, pos_a), acts(tokens_b, pos_b)
    if xa.shape[0] < 2 or xb.shape[0] < 2:
        raise ValueError("separating_neurons needs at least 2 prompts in each set to estimate "
                         "a spread")
    std = ((xa.var(0, unbiased=False) + xb.var(0, unbiased=False)) / 2).sqrt()
    score = (xa.mean(0) - xb.mean(0)) / std.clamp_min(1e-6)
    return Result("neuron separation (d')", ("layer", "neuron"),
                  {"layer": [str(x) for x in layers], "neuron": _labels(score.shape[-1])}, score)
