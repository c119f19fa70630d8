"""Direct logit attribution, logit lens, neuron and steering helpers against TransformerLens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mechtests.analysis import attribution as A
from mechtests.core.metrics import logit_diff

N, T = 5, 9


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def data(model):
    g = torch.Generator().manual_seed(0)
    v = model.cfg.d_vocab
    toks = torch.randint(2, v, (N, T), generator=g)
    toks[:, 0] = 0
    ans = torch.randint(2, v, (N,), generator=g)
    cf = (ans - 2 + torch.randint(1, v - 2, (N,), generator=g)) % (v - 2) + 2   # != ans
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
    return SimpleNamespace(toks=toks, ans=ans, cf=cf, logits=logits, cache=cache)


def _ld(logits, ans, cf):
    return logits.gather(-1, ans[:, None])[:, 0] - logits.gather(-1, cf[:, None])[:, 0]


def _dirs(model, ans, cf):
    return (model.W_U[:, ans] - model.W_U[:, cf]).detach()                    # [d, n]


def test_component_attribution_matches_tl_and_sums_to_logit_diff(model, data):
    pos = torch.tensor([8, 3, 5, 8, 1])                                       # one per prompt
    r = A.logit_attribution(model, data.toks, data.ans, data.cf, pos=pos)
    assert r.axes == ("component",)
    assert r.labels["component"] == ["embed", "pos_embed", "attn_0", "mlp_0", "attn_1", "mlp_1"]
    lg = data.logits[torch.arange(N), pos]
    actual = _ld(lg, data.ans, data.cf)
    total = r.per_prompt.sum(1) + torch.tensor(r.meta["b_U"])
    assert (total - actual).abs().max() < 1e-4
    assert torch.allclose(torch.tensor(r.meta["metric"]), actual, atol=1e-5)
    # TL: decompose_resid + apply_ln_to_stack (cached final scale), read at each prompt's pos
    stack = data.cache.apply_ln_to_stack(data.cache.decompose_resid())          # [C, n, T, d]
    tl = torch.einsum("cnd,dn->nc", stack[:, torch.arange(N), pos], _dirs(model, data.ans,
                                                                           data.cf))
    assert (tl - r.per_prompt).abs().max() < 1e-4
    assert torch.allclose(r.values, r.per_prompt.mean(0))


def test_head_and_neuron_attribution_match_tl(model, data):
    c = data.cache
    heads = A.head_attribution(model, data.toks, data.ans, data.cf)
    stack = c.stack_head_results(layer=-1, pos_slice=-1)
    tl = c.logit_attrs(stack, tokens=data.ans, incorrect_tokens=data.cf, pos_slice=-1)
    assert heads.axes == ("layer", "head")
    assert (tl.T.reshape(N, 2, 4) - heads.per_prompt).abs().max() < 1e-4
    neurons = A.neuron_attribution(model, data.toks, data.ans, data.cf)
    stack = c.stack_neuron_results(layer=-1, pos_slice=-1)
    tl = c.logit_attrs(stack, tokens=data.ans, incorrect_tokens=data.cf, pos_slice=-1)
    assert neurons.axes == ("layer", "neuron")
    assert (tl.T.reshape(N, 2, -1) - neurons.per_prompt).abs().max() < 1e-4
    # heads + b_O make attn_L, neurons + b_out make mlp_L
    comp = A.logit_attribution(model, data.toks, data.ans, data.cf)
    attn = heads.per_prompt.sum(-1) + torch.tensor(heads.meta["b_O"])
    mlp = neurons.per_prompt.sum(-1) + torch.tensor(neurons.meta["b_out"])
    assert (attn - comp.per_prompt[:, [2, 4]]).abs().max() < 1e-4
    assert (mlp - comp.per_prompt[:, [3, 5]]).abs().max() < 1e-4
    assert heads.top_k(1)[0][0].count(".") == 1                               # "L.H"


def test_single_answer_direction_is_the_answer_logit(model, data):
    r = A.logit_attribution(model, data.toks, data.ans)
    actual = data.logits[:, -1].gather(-1, data.ans[:, None])[:, 0]
    assert (r.per_prompt.sum(1) + torch.tensor(r.meta["b_U"]) - actual).abs().max() < 1e-4


def test_logit_lens_matches_tl_accumulated_resid(model, data):
    c, d = data.cache, _dirs(model, data.ans, data.cf)
    bias = (model.b_U[data.ans] - model.b_U[data.cf]).detach()[:, None]
    true_lens, labels = c.accumulated_resid(apply_ln=True, incl_mid=True, pos_slice=-1,
                                            return_labels=True)
    r = A.logit_lens(model, data.toks, data.ans, data.cf)
    assert r.labels["layer"] == labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    assert (torch.einsum("snd,dn->ns", true_lens, d) + bias - r.per_prompt).abs().max() < 1e-4
    raw = c.accumulated_resid(incl_mid=True, pos_slice=-1)
    cached = c.apply_ln_to_stack(raw, pos_slice=-1)
    r2 = A.logit_lens(model, data.toks, data.ans, data.cf, recompute_ln=False)
    assert (torch.einsum("snd,dn->ns", cached, d) + bias - r2.per_prompt).abs().max() < 1e-4
    actual = _ld(data.logits[:, -1], data.ans, data.cf)
    for res in (r, r2):
        assert (res.per_prompt[:, -1] - actual).abs().max() < 1e-4
    assert (r.per_prompt[:, :-1] - r2.per_prompt[:, :-1]).abs().max() > 1e-3  # they differ
    short = A.logit_lens(model, data.toks, data.ans, data.cf, incl_mid=False)
    assert short.labels["layer"] == ["0_pre", "1_pre", "final_post"]


def test_bridge_fallback_matches_engine(model, data, monkeypatch):
    via_engine = A.logit_attribution(model, data.toks, data.ans, data.cf)
    ablate_engine = A.neuron_ablation_effect(model, data.toks, 1, [3, 4], how="mean")
    monkeypatch.setattr(A, "_engine", lambda m: None)
    via_bridge = A.logit_attribution(model, data.toks, data.ans, data.cf)
    ablate_bridge = A.neuron_ablation_effect(model, data.toks, 1, [3, 4], how="mean")
    assert (via_engine.per_prompt - via_bridge.per_prompt).abs().max() < 1e-4
    assert (ablate_engine.per_prompt - ablate_bridge.per_prompt).abs().max() < 1e-4


def test_bad_inputs_say_what_to_fix(model, data):
    with pytest.raises(ValueError, match="position 9 of prompt 0 is beyond the prompt length 9"):
        A.logit_attribution(model, data.toks, data.ans, data.cf, pos=9)
    with pytest.raises(ValueError, match="got 2 positions for 5 prompts"):
        A.logit_lens(model, data.toks, data.ans, data.cf, pos=[1, 2])
    with pytest.raises(ValueError, match="3 answer ids for 5 prompts"):
        A.head_attribution(model, data.toks, data.ans[:3], data.cf[:3])
    with pytest.raises(ValueError, match="must have one id per prompt"):
        A.logit_attribution(model, data.toks, data.ans, data.cf[:2])
    with pytest.raises(ValueError, match="unknown layer 2: the model has layers 0..1"):
        A.neuron_ablation_effect(model, data.toks, 2, [0])
    with pytest.raises(ValueError, match=r"each in 0\.\.127"):
        A.neuron_ablation_effect(model, data.toks, 0, [128])
    with pytest.raises(ValueError, match="how='bogus'"):
        A.neuron_ablation_effect(model, data.toks, 0, [0], how="bogus")
    with pytest.raises(ValueError, match="site='resid'"):
        A.mean_difference_direction(model, data.toks, data.toks, 0, site="resid")
    with pytest.raises(ValueError, match="enable_compatibility_mode"):
        A.logit_direction(SimpleNamespace(compatibility_mode=False), data.ans)
    with pytest.raises(ValueError, match="d_model=32"):
        A.steering_sweep(model, data.toks, torch.ones(5), 0, [0.0], lambda lg: lg[..., 0])


def test_unembed_null_space_and_neuron_norms(model):
    w_u = model.W_U.detach()
    null = A.unembed_null_space(model)                     # default k = ceil(2% of 32) = 1
    assert null.shape == (32, 1)
    null = A.unembed_null_space(model, k=3)
    assert torch.allclose(null.T @ null, torch.eye(3), atol=1e-5)
    assert null.sum(0).abs().max() < 1e-4                  # orthogonal to the all-ones direction
    # compat mode centres W_U, so its full SVD has one ~0 singular value (the ones direction);
    # the null space is the 3 directions just above it
    u, s, _ = torch.linalg.svd(w_u, full_matrices=False)
    assert s[-1] < 1e-4 * s[0]
    assert torch.allclose(null @ null.T, u[:, -4:-1] @ u[:, -4:-1].T, atol=1e-4)
    assert torch.allclose((w_u.T @ null).norm(dim=0).sort().values, s[-4:-1].sort().values,
                          atol=1e-4)
    frac = A.unembed_null_fraction(model, k=3)
    w = model.W_out.detach()
    expect = (w @ u[:, -4:-1]).pow(2).sum(-1) / w.pow(2).sum(-1)
    assert frac.axes == ("layer", "neuron") and frac.meta["k"] == 3
    assert (frac.values - expect).abs().max() < 1e-4
    assert torch.allclose(A.neuron_output_norms(model).values, w.norm(dim=-1))
    with pytest.raises(ValueError, match="choose 1 <= k < d_model=32"):
        A.unembed_null_space(model, k=32)


@pytest.mark.parametrize("how", ["zero", "mean"])
def test_neuron_ablation_effect_matches_hooked_runs(model, data, how):
    neurons = [0, 5, 7]
    r = A.neuron_ablation_effect(model, data.toks, 0, neurons, how=how)
    assert r.labels == {"neuron": ["0.0", "0.5", "0.7"], "measure": ["entropy", "top_logit"]}
    clean = data.logits[:, -1]
    top = clean.argmax(-1)
    mean_act = data.cache["blocks.0.mlp.hook_post"].mean((0, 1))

    def ent(lg):
        lp = lg.log_softmax(-1)
        return -(lp.exp() * lp).sum(-1)

    for i, j in enumerate(neurons):
        def hook(act, hook, j=j):
            act = act.clone()
            act[..., j] = 0.0 if how == "zero" else mean_act[j]
            return act

        with torch.no_grad():
            lg = model.run_with_hooks(data.toks, fwd_hooks=[("blocks.0.mlp.hook_post", hook)])
        lg = lg[:, -1]
        d_ent = ent(lg) - ent(clean)
        d_top = lg.gather(-1, top[:, None])[:, 0] - clean.gather(-1, top[:, None])[:, 0]
        assert (r.per_prompt[:, i, 0] - d_ent).abs().max() < 1e-4
        assert (r.per_prompt[:, i, 1] - d_top).abs().max() < 1e-4
    assert r.per_prompt.abs().max() > 1e-4                 # ablation does something


def test_mean_difference_direction_and_steering(model, data):
    a, b = data.toks[:3], data.toks[2:]
    d = A.mean_difference_direction(model, a, b, 1, pos_a=[1, 2, 3], pos_b=-1)
    c = data.cache["blocks.1.hook_resid_pre"]
    expect = c[:3][torch.arange(3), torch.tensor([1, 2, 3])].mean(0) - c[2:, -1].mean(0)
    assert torch.allclose(d, expect, atol=1e-5)
    unit = A.mean_difference_direction(model, a, b, 1, site="resid_post", normalize=True)
    assert abs(float(unit.norm()) - 1) < 1e-5

    metric = logit_diff(data.ans, data.cf)                  # (alpha, n, V) -> (alpha, n)
    alphas = [-2.0, 0.0, 0.5, 3.0]
    r = A.steering_sweep(model, data.toks, d, 1, alphas, metric)
    assert r.labels["alpha"] == ["-2", "0", "0.5", "3"]
    assert (r.per_prompt[:, 1] - metric(data.logits[:, -1])).abs().max() < 1e-4

    def add(act, hook):
        return act + 3.0 * d

    with torch.no_grad():
        lg = model.run_with_hooks(data.toks, fwd_hooks=[("blocks.1.hook_resid_pre", add)])
    assert (r.per_prompt[:, 3] - metric(lg[:, -1])).abs().max() < 1e-4
    # steering along the logit-difference direction itself moves the metric up, ~linearly
    along = _dirs(model, data.ans, data.cf).mean(1)
    small = A.steering_sweep(model, data.toks, along, 1, [-0.2, -0.1, 0.0, 0.1, 0.2], metric,
                             site="resid_post")
    assert small.meta["slope"] > 0 and small.meta["r2"] > 0.9
    one = A.steering_sweep(model, data.toks, d, 0, [3.0], metric, steer_pos=4)
    with torch.no_grad():
        def add4(act, hook):
            act = act.clone()
            act[:, 4] += 3.0 * d
            return act
        lg = model.run_with_hooks(data.toks, fwd_hooks=[("blocks.0.hook_resid_pre", add4)])
    assert (one.per_prompt[:, 0] - metric(lg[:, -1])).abs().max() < 1e-4


def _d_prime(xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Reference d' from the definition, in float64, neuron by neuron with the statistics module."""
    import statistics as st

    out = []
    for a, b in zip(xa.double().T.tolist(), xb.double().T.tolist()):
        pooled = ((st.pvariance(a) + st.pvariance(b)) / 2) ** 0.5
        out.append((st.fmean(a) - st.fmean(b)) / max(pooled, 1e-6))
    return torch.tensor(out)


def test_separating_neurons(model, data):
    a, b = data.toks[:3], data.toks[3:]
    r = A.separating_neurons(model, a, b, layer=1)
    assert r.labels["layer"] == ["1"] and r.values.shape == (1, 128)
    post = data.cache["blocks.1.mlp.hook_post"][:, -1]                    # TL's cache
    assert (r.values[0].double() - _d_prime(post[:3], post[3:])).abs().max() < 1e-3
    # every layer, each set read at its own positions (per prompt for a, one for b)
    pa, pb = [1, 4, 8], 2
    both = A.separating_neurons(model, a, b, pos_a=pa, pos_b=pb)
    assert both.labels["layer"] == ["0", "1"] and both.values.shape == (2, 128)
    ref = torch.stack([_d_prime(acts[torch.arange(3), torch.tensor(pa)], acts[3:, pb])
                       for acts in (data.cache[f"blocks.{la}.mlp.hook_post"] for la in (0, 1))])
    assert (both.values.double() - ref).abs().max() < 1e-3
    layer, neuron = divmod(int(ref.argmax()), 128)                       # the most A-selective
    assert both.top_k(1)[0][0] == f"{layer}.{neuron}"
    with pytest.raises(ValueError, match="at least 2 prompts"):
        A.separating_neurons(model, a[:1], b)
