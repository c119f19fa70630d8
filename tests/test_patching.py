"""Every batched sweep equals TransformerLens's own (or a one-patch-per-forward hook loop)."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformer_lens.patching as tlp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mechtests.analysis import patching as P
from mechtests.core.engine import Engine
from mechtests.core.models import load_model
from mechtests.testing import compare_attribution_with_tl, save_rich_checkpoint

ATOL = 1e-4


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    model = load_model(str(save_rich_checkpoint(tmp_path_factory.mktemp("rich") / "m")), "cpu")
    return model, Engine(model)


def make_prompts(vocab: int, n: int, T: int, seed: int):
    """Clean/corrupted pairs whose corruptions sit at different positions per prompt (different
    templates), plus a per-prompt logit-difference metric."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, vocab, (n, T), generator=g)
    clean[:, 0] = 0  # a shared BOS
    corrupted = clean.clone()
    for i in range(n):
        at = 1 + (2 * i + seed) % (T - 1)
        corrupted[i, at] = (clean[i, at] + 1 + i) % (vocab - 2) + 2
    ans = torch.randint(2, vocab, (n,), generator=g)
    cf = (ans + 3) % vocab

    def metric(logits):
        a = ans.expand(logits.shape[:-1])[..., None]
        c = cf.expand(logits.shape[:-1])[..., None]
        return logits.gather(-1, a)[..., 0] - logits.gather(-1, c)[..., 0]

    return clean, corrupted, metric


@pytest.fixture(scope="module", params=[(1, 7), (3, 8)], ids=["one-prompt", "family"])
def prompts(rich, request):
    n, T = request.param
    return make_prompts(rich[0].cfg.d_vocab, n, T, seed=n)


def tl_metric(metric, read=-1):
    return lambda logits: metric(logits[:, read])


# site, TL sweep, by, permutation from TL's [cells..., batch] to ours [batch, cells...]
TL_SWEEPS = [
    ("resid_pre", tlp.get_act_patch_resid_pre, ("layer", "pos"), (2, 0, 1)),
    ("attn_out", tlp.get_act_patch_attn_out, ("layer", "pos"), (2, 0, 1)),
    ("mlp_out", tlp.get_act_patch_mlp_out, ("layer", "pos"), (2, 0, 1)),
    ("z", tlp.get_act_patch_attn_head_out_all_pos, ("layer", "head"), (2, 0, 1)),
    ("q", tlp.get_act_patch_attn_head_q_all_pos, ("layer", "head"), (2, 0, 1)),
    ("k", tlp.get_act_patch_attn_head_k_all_pos, ("layer", "head"), (2, 0, 1)),
    ("v", tlp.get_act_patch_attn_head_v_all_pos, ("layer", "head"), (2, 0, 1)),
    ("pattern", tlp.get_act_patch_attn_head_pattern_all_pos, ("layer", "head"), (2, 0, 1)),
    ("z", tlp.get_act_patch_attn_head_out_by_pos, ("layer", "head", "pos"), (3, 0, 2, 1)),
    ("q", tlp.get_act_patch_attn_head_q_by_pos, ("layer", "head", "pos"), (3, 0, 2, 1)),
    ("k", tlp.get_act_patch_attn_head_k_by_pos, ("layer", "head", "pos"), (3, 0, 2, 1)),
    ("v", tlp.get_act_patch_attn_head_v_by_pos, ("layer", "head", "pos"), (3, 0, 2, 1)),
    ("pattern", tlp.get_act_patch_attn_head_pattern_by_pos, ("layer", "head", "pos"),
     (3, 0, 1, 2)),
]


LEAD = pytest.mark.parametrize("lead_rows", [0, 10**6], ids=["runs-first", "runs-in-batch"])


@LEAD
@pytest.mark.parametrize("site,tl_fn,by,perm", TL_SWEEPS,
                         ids=[f"{s}-{'/'.join(b)}" for s, _, b, _ in TL_SWEEPS])
def test_sweep_equals_transformer_lens(rich, prompts, site, tl_fn, by, perm, lead_rows,
                                       monkeypatch):
    """With the unpatched runs before the patches, or in the first patched batch."""
    monkeypatch.setattr(P, "LEAD_ROWS", lead_rows)
    model, engine = rich
    clean, corrupted, metric = prompts
    ours = P.sweep(engine, site, clean, corrupted, metric, by=by)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        tl = tl_fn(model, corrupted, clean_cache, tl_metric(metric), reduce="none").values
    assert ours.per_prompt.shape == tl.permute(*perm).shape
    assert torch.allclose(ours.per_prompt, tl.permute(*perm), atol=ATOL)
    assert torch.allclose(ours.values, ours.per_prompt.mean(0))
    assert ours.axes == by and len(ours.labels["layer"]) == engine.n_layers


def hook_loop(model, base, source, metric, read=-1):
    """Reference: one TransformerLens forward per patch (the bridge's hooks), replacing
    ``name[idx]`` in the run on ``base`` with its value in the run on ``source``."""
    with torch.no_grad():
        _, src = model.run_with_cache(source)

    def run(name, idx):
        def hook(a, hook=None):
            a = a.clone()
            a[idx] = src[name][idx]
            return a
        with torch.no_grad():
            logits = model.run_with_hooks(base, fwd_hooks=[(name, hook)])
        return metric(logits[torch.arange(len(base)), read])
    return run


def test_resid_mid_equals_hook_loop(rich, prompts):
    """The bridge's hook_resid_mid is an alias of ln2.hook_in (patching it changes only the MLP
    input), so TL's get_act_patch_resid_mid is not the residual-stream patch. The reference sets
    the residual stream after attention through TL's own hooks instead: at the patched position,
    attn_out := source resid_mid - this run's resid_pre (resid_mid = resid_pre + attn_out)."""
    model, engine = rich
    clean, corrupted, metric = prompts
    ours = P.patch_resid_mid(engine, clean, corrupted, metric)
    with torch.no_grad():
        _, src = model.run_with_cache(clean)
    pre = {}

    def grab(a, hook=None):
        pre["x"] = a
        return a

    for la, p in itertools.product(range(engine.n_layers), range(clean.shape[1])):

        def attn(a, hook=None, la=la, p=p):
            a = a.clone()
            a[:, p] = src[f"blocks.{la}.hook_resid_mid"][:, p] - pre["x"][:, p]
            return a
        with torch.no_grad():
            logits = model.run_with_hooks(corrupted, fwd_hooks=[
                (f"blocks.{la}.hook_resid_pre", grab), (f"blocks.{la}.hook_attn_out", attn)])
        assert torch.allclose(ours.per_prompt[:, la, p], metric(logits[:, -1]), atol=ATOL)


def test_noising_equals_transformer_lens(rich, prompts):
    model, engine = rich
    clean, corrupted, metric = prompts
    ours = P.patch_resid_pre(engine, clean, corrupted, metric, direction="noise")
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(corrupted)
        tl = tlp.get_act_patch_resid_pre(model, clean, corrupted_cache, tl_metric(metric),
                                         reduce="none").values
    assert torch.allclose(ours.per_prompt, tl.permute(2, 0, 1), atol=ATOL)
    assert ours.meta["direction"] == "noise"


def test_per_prompt_read_position_and_tiny_budget(rich):
    model, engine = rich
    clean, corrupted, metric = make_prompts(model.cfg.d_vocab, 3, 8, seed=5)
    read = torch.tensor([7, 3, 5])
    ours = P.sweep(engine, "k", clean, corrupted, metric, by=("layer", "head", "pos"),
                   read_pos=read, memory_budget_mb=0.01)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        tl = tlp.get_act_patch_attn_head_k_by_pos(
            model, corrupted, clean_cache, lambda lg: metric(lg[torch.arange(3), read]),
            reduce="none").values
    assert torch.allclose(ours.per_prompt, tl.permute(3, 0, 2, 1), atol=ATOL)


@LEAD
def test_neurons_equal_hook_loop(rich, prompts, lead_rows, monkeypatch):
    monkeypatch.setattr(P, "LEAD_ROWS", lead_rows)
    _, engine = rich
    clean, corrupted, metric = prompts
    positions, neurons = [2, clean.shape[1] - 1], [0, 5, 77, 127]
    ours = P.patch_neurons(engine, clean, corrupted, metric, positions=positions, neurons=neurons)
    names = [f"blocks.{la}.mlp.hook_post" for la in range(engine.n_layers)]
    ref = hook_loop(rich[0], corrupted, clean, metric)
    for la, (j, n) in itertools.product(range(engine.n_layers), enumerate(neurons)):
        want = ref(names[la], (slice(None), positions, n))
        assert torch.allclose(ours.per_prompt[:, la, j], want, atol=ATOL)
    assert ours.meta["positions"] == positions


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_path_patching_equals_transformer_lens_direct_path(rich, prompts, component):
    model, engine = rich
    clean, corrupted, metric = prompts
    with torch.no_grad():
        _, cc = model.run_with_cache(clean)
        _, kc = model.run_with_cache(corrupted)
        for src in [(0, 1), (1, 3)]:
            tl = tlp.get_act_patch_direct_path(model, corrupted, cc, kc,
                                               lambda lg: metric(lg[:, -1]).mean(), *src,
                                               component=component, verbose=False)
            for dst in [(1, 2), (2, 0)]:
                if dst[0] <= src[0]:
                    continue
                ours = P.path_patch(engine, clean, corrupted, metric, [f"{dst[0]}.{dst[1]}"],
                                    component=component)
                assert abs(ours.at(layer=src[0], head=src[1]) - float(tl[dst])) < ATOL


def test_path_patching_to_a_set_equals_hook_loop(rich, prompts):
    """Two receivers in different layers: each receiver's query input gets the sender's write.
    The reference runs TransformerLens's forward with its hooks: each receiver's query is
    recomputed by hand from the hooked residual stream plus the write (compat mode: LayerNorm
    folded into W_Q, so only centring and scaling remain)."""
    model, engine = rich
    clean, corrupted, metric = prompts
    ours = P.path_patch(engine, clean, corrupted, metric, ["1.2", "2.0"], component="q")
    with torch.no_grad():
        _, cz = model.run_with_cache(clean)
        logits_k, kz = model.run_with_cache(corrupted)
    write = (cz["blocks.0.attn.hook_z"][:, :, 3] - kz["blocks.0.attn.hook_z"][:, :, 3]) \
        @ model.W_O[0, 3]
    acts = {}

    def grab(name):
        def f(a, hook=None):
            acts[name] = a
            return a
        return f

    def recv(layer, head):
        def f(q, hook=None):
            x = acts[f"blocks.{layer}.hook_resid_pre"] + write
            x = x - x.mean(-1, keepdim=True)
            x = x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
            q = q.clone()
            q[:, :, head] = x @ model.W_Q[layer, head] + model.b_Q[layer, head]
            return q
        return f
    with torch.no_grad():
        logits = model.run_with_hooks(corrupted, fwd_hooks=[
            ("blocks.1.hook_resid_pre", grab("blocks.1.hook_resid_pre")),
            ("blocks.2.hook_resid_pre", grab("blocks.2.hook_resid_pre")),
            ("blocks.1.attn.hook_q", recv(1, 2)), ("blocks.2.attn.hook_q", recv(2, 0))])
    assert torch.allclose(ours.per_prompt[:, 0, 3], metric(logits[:, -1]), atol=ATOL)
    # senders in or after the last receiver's layer change nothing: the corrupted run's metric
    assert torch.allclose(ours.per_prompt[:, 2], metric(logits_k[:, -1])[:, None]
                          .expand(-1, engine.n_heads), atol=ATOL)


ABLATED = [("0.1", "blocks.0.attn.hook_z", (slice(None), slice(None), 1)),
           ("2.3", "blocks.2.attn.hook_z", (slice(None), slice(None), 3)),
           ("attn1", "blocks.1.hook_attn_out", (slice(None),)),
           ("mlp0", "blocks.0.hook_mlp_out", (slice(None),)),
           ("mlp2.5", "blocks.2.mlp.hook_post", (slice(None), slice(None), 5))]


def _hooked_ablation(model, tokens, metric, ablated, value_of):
    """The metric with each (name, idx) in ``ablated`` replaced by ``value_of(name)[idx]``, in
    one TransformerLens forward (the bridge's hooks)."""
    def hook(name, idx):
        def f(a, hook=None):
            a = a.clone()
            a[idx] = value_of(name).to(a.dtype).expand_as(a)[idx]
            return a
        return (name, f)
    with torch.no_grad():
        return metric(model.run_with_hooks(tokens, fwd_hooks=[hook(n, i) for n, i in ablated])
                      [:, -1])


@pytest.mark.parametrize("how", ["zero", "mean", "resample"])
def test_ablations_equal_transformer_lens_hooks(rich, prompts, how):
    """The replacement values come from TransformerLens's cache of the reference prompts (zero,
    the per-position mean, or one reference prompt's own activation), never from the library."""
    model, engine = rich
    _, tokens, metric = prompts
    reference = make_prompts(model.cfg.d_vocab, 5, tokens.shape[1], seed=9)[0]
    names = [c for c, _, _ in ABLATED]
    with torch.no_grad():
        _, cache = model.run_with_cache(reference)
    singly = P.ablate(engine, tokens, names, metric, how=how, reference=reference)
    together = P.ablate(engine, tokens, names, metric, how=how, reference=reference,
                        together=True)
    assert together.labels["component"] == ["+".join(names)]
    pairs = [(n, i) for _, n, i in ABLATED]
    if how == "resample":
        # each prompt takes one reference prompt's activations, the same one for every component
        rows = [lambda name, r=r: cache[name][r:r + 1] for r in range(len(reference))]
    else:
        rows = [(lambda name: torch.zeros_like(cache[name][:1])) if how == "zero"
                else (lambda name: cache[name].mean(0, keepdim=True))]
    refs = [torch.stack([_hooked_ablation(model, tokens, metric, [p], row) for p in pairs], 1)
            for row in rows]                                             # [N, component] each
    alls = [_hooked_ablation(model, tokens, metric, pairs, row) for row in rows]       # [N]
    for i in range(len(tokens)):
        assert any(torch.allclose(singly.per_prompt[i], ref[i], atol=ATOL)
                   and torch.allclose(together.per_prompt[i, 0], full[i], atol=ATOL)
                   for ref, full in zip(refs, alls)), (how, i)
    # the ablations do something (else the comparison above says little)
    with torch.no_grad():
        clean = metric(model(tokens)[:, -1])
    assert (singly.per_prompt - clean[:, None]).abs().max() > 5 * ATOL


def test_mean_ablation_over_a_reference_of_another_length(rich, prompts):
    """Reference prompts of another length: the mean over their prompts and positions."""
    model, engine = rich
    _, tokens, metric = prompts
    reference = make_prompts(model.cfg.d_vocab, 4, tokens.shape[1] + 3, seed=5)[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(reference)
    got = P.ablate(engine, tokens, ["attn1", "2.3"], metric, how="mean", reference=reference)
    for j, (name, idx) in enumerate([ABLATED[2][1:], ABLATED[1][1:]]):
        ref = _hooked_ablation(model, tokens, metric, [(name, idx)],
                               lambda n: cache[n].mean((0, 1), keepdim=True))
        assert torch.allclose(got.per_prompt[:, j], ref, atol=ATOL)


def test_resample_is_seeded(rich, prompts):
    model, engine = rich
    _, tokens, metric = prompts
    reference = make_prompts(model.cfg.d_vocab, 6, tokens.shape[1], seed=9)[0]
    a = P.ablate(engine, tokens, ["1.1"], metric, how="resample", reference=reference, seed=3)
    b = P.ablate(engine, tokens, ["1.1"], metric, how="resample", reference=reference, seed=3)
    assert torch.equal(a.per_prompt, b.per_prompt)


@pytest.mark.parametrize("shared_rows", [0, 10**6], ids=["separate-runs", "one-batch"])
def test_attribution_equals_transformer_lens(rich, prompts, shared_rows, monkeypatch):
    """TL's attribution_patch scores embed/head/MLP nodes per position, prompt by prompt;
    with the source run in its own forward or in the gradient run's batch."""
    from transformer_lens.tools.analysis import attribution_patch as tl_attribution_patch

    monkeypatch.setattr(P, "ATTRIBUTION_SHARED_ROWS", shared_rows)
    model, engine = rich
    clean, corrupted, _ = prompts

    def fixed(logits):  # TL calls its metric per prompt without the index: same for all
        return logits[..., 5] - logits[..., 7]
    tl = tl_attribution_patch(model, clean, corrupted, lambda lg: fixed(lg[0, -1]))
    ours = P.attribution_patches(engine, [("z", ("layer", "head", "pos")), "mlp_out",
                                          "resid_pre"], clean, corrupted, fixed)
    seen = compare_attribution_with_tl(ours, tl, ATOL)
    assert seen == clean.shape[1] * (1 + engine.n_layers * (engine.n_heads + 1))


HOOK = {**{s: h for s, (h, _) in P.RESID_SITES.items()}, **P.HEAD_SITES, **P.NEURON_SITES}


@pytest.mark.parametrize("site", P.SITES)
def test_attribution_is_the_directional_derivative(rich, site):
    """Each cell = d metric / d eps with the cell's activation moved by eps * (source - base),
    computed independently through an edit; and it ranks like the exact sweep's effects."""
    model, engine = rich
    clean, corrupted, metric = make_prompts(model.cfg.d_vocab, 2, 7, seed=2)
    approx = P.attribution_patch(engine, site, clean, corrupted, metric)
    exact = P.sweep(engine, site, clean, corrupted, metric)
    assert approx.axes == exact.axes and approx.values.shape == exact.values.shape
    layer, j = 1, 2
    name = f"blocks.{layer}.{HOOK[site]}"
    _, src = engine.run(clean, [name])
    idx = {"pos": (slice(None), j), "head": (slice(None), slice(None), j),
           "neuron": (slice(None), slice(None), j)}[approx.axes[1]]
    if site == "pattern":
        idx = (slice(None), j)
    eps = torch.zeros((), requires_grad=True)

    def nudge(a):
        a = a.clone()
        a[idx] = a[idx] + eps * (src[name][idx] - a[idx].detach())
        return a
    with torch.enable_grad():
        logits, _ = engine.run(corrupted, edits={name: nudge}, logits_at=-1)
        (grad,) = torch.autograd.grad(metric(logits).sum(), eps)
    assert float(approx.per_prompt[:, layer, j].sum()) == pytest.approx(float(grad), abs=1e-5)
    if site in ("resid_pre", "z", "mlp_out"):
        assert P.rank_correlation(approx, exact) > 0.3


def test_rank_correlation():
    from mechtests.core.result import Result

    def res(v):
        return Result("r", ("component",), {"component": [str(i) for i in range(len(v))]},
                      torch.tensor(v, dtype=torch.float32))
    assert P.rank_correlation(res([1, 2, 3, 4]), res([10, 20, 30, 40])) == pytest.approx(1)
    assert P.rank_correlation(res([1, 2, 3, 4]), res([4, 3, 2, 1])) == pytest.approx(-1)
    assert P.rank_correlation(res([1, 1, 2]), res([5, 5, 7])) == pytest.approx(1)
    with pytest.raises(ValueError, match="same site"):
        P.rank_correlation(res([1, 2]), res([1, 2, 3]))


# -- properties -------------------------------------------------------------------------------
PROPS = settings(max_examples=12, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPS
@given(site=st.sampled_from(P.SITES), seed=st.integers(0, 999), n=st.integers(1, 3),
       T=st.integers(3, 8))
def test_clean_into_clean_changes_nothing(rich, site, seed, n, T):
    model, engine = rich
    clean, _, metric = make_prompts(model.cfg.d_vocab, n, T, seed)
    r = P.sweep(engine, site, clean, clean, metric)
    base = torch.tensor(r.meta["clean_per_prompt"])
    assert torch.allclose(r.per_prompt, base.view(n, *[1] * len(r.axes)).expand_as(r.per_prompt),
                          atol=ATOL)


@PROPS
@given(seed=st.integers(0, 999), n=st.integers(1, 3), T=st.integers(3, 8),
       direction=st.sampled_from(["denoise", "noise"]))
def test_whole_residual_at_layer_0_gives_the_source_metric(rich, seed, n, T, direction):
    model, engine = rich
    clean, corrupted, metric = make_prompts(model.cfg.d_vocab, n, T, seed)
    r = P.sweep(engine, "resid_pre", clean, corrupted, metric, by=("layer",), layers=[0],
                direction=direction)
    want = r.meta["clean_per_prompt" if direction == "denoise" else "corrupted_per_prompt"]
    assert torch.allclose(r.per_prompt[:, 0], torch.tensor(want), atol=ATOL)


@PROPS
@given(site=st.sampled_from(["resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "k", "v"]),
       seed=st.integers(0, 999), T=st.integers(3, 8), data=st.data())
def test_patch_leaves_earlier_positions_untouched(rich, site, seed, T, data):
    """Read before the patched position: the metric is the unpatched one, exactly."""
    model, engine = rich
    clean, corrupted, metric = make_prompts(model.cfg.d_vocab, 2, T, seed)
    p = data.draw(st.integers(1, T - 1))
    read = data.draw(st.integers(0, p - 1))
    by = ("layer", "pos") if site in P.RESID_SITES else ("layer", "head", "pos")
    r = P.sweep(engine, site, clean, corrupted, metric, by=by, positions=[p], read_pos=read)
    base = torch.tensor(r.meta["corrupted_per_prompt"])
    assert torch.allclose(r.per_prompt.reshape(2, -1), base[:, None].expand(2, r.values.numel()),
                          atol=1e-6)


@PROPS
@given(seed=st.integers(0, 999), n=st.integers(1, 3), T=st.integers(3, 8))
def test_normalized_restoration_is_0_unpatched_and_1_fully_patched(rich, seed, n, T):
    model, engine = rich
    clean, corrupted, metric = make_prompts(model.cfg.d_vocab, n, T, seed)
    r = P.sweep(engine, "resid_pre", clean, corrupted, metric, layers=[0])
    assume(abs(r.meta["clean"] - r.meta["corrupted"]) > 1e-3)
    norm = r.normalized(r.meta["clean"], r.meta["corrupted"])
    assert norm.at(layer=0, pos=0) == pytest.approx(0, abs=1e-4)  # BOS: shared, no change
    full = P.sweep(engine, "resid_pre", clean, corrupted, metric, by=("layer",), layers=[0])
    assert full.normalized(full.meta["clean"], full.meta["corrupted"]).at(layer=0) \
        == pytest.approx(1, abs=1e-3)


# -- bad input --------------------------------------------------------------------------------
def test_bad_input_errors(rich):
    model, engine = rich
    clean, corrupted, metric = make_prompts(model.cfg.d_vocab, 2, 5, seed=0)
    with pytest.raises(ValueError, match=r"unknown site 'resid'.*resid_pre, resid_mid"):
        P.sweep(engine, "resid", clean, corrupted, metric)
    with pytest.raises(ValueError, match=r"layer 3 out of range: valid layers are 0..2"):
        P.patch_resid_pre(engine, clean, corrupted, metric, layers=[3])
    with pytest.raises(ValueError, match=r"head 4 out of range: valid heads are 0..3"):
        P.patch_head_out(engine, clean, corrupted, metric, heads=[4])
    with pytest.raises(ValueError, match=r"position 5 out of range.*0..4 \(the prompt has 5"):
        P.patch_resid_pre(engine, clean, corrupted, metric, positions=[5])
    with pytest.raises(ValueError, match=r"read position \[9, 9\] beyond the prompt.*0..4"):
        P.patch_resid_pre(engine, clean, corrupted, metric, read_pos=9)
    with pytest.raises(ValueError, match=r"one value per prompt.*returned shape \(\)"):
        P.patch_resid_pre(engine, clean, corrupted, lambda lg: metric(lg).mean())
    with pytest.raises(ValueError, match=r"swept by one of"):
        P.sweep(engine, "z", clean, corrupted, metric, by=("layer", "pos"))
    with pytest.raises(ValueError, match=r"direction must be"):
        P.sweep(engine, "z", clean, corrupted, metric, direction="sideways")
    with pytest.raises(ValueError, match=r"same shape"):
        P.sweep(engine, "z", clean, corrupted[:, :4], metric)
    with pytest.raises(ValueError, match=r"unknown component 'head9'.*'9.9'"):
        P.ablate(engine, clean, ["head9"], metric)
    with pytest.raises(ValueError, match=r"layer 7 out of range.*in component '7.1'"):
        P.ablate(engine, clean, ["7.1"], metric)
    with pytest.raises(ValueError, match=r"mean ablation needs reference"):
        P.ablate(engine, clean, ["1.1"], metric, how="mean")
    with pytest.raises(ValueError, match=r"'zero', 'mean' or 'resample'"):
        P.ablate(engine, clean, ["1.1"], metric, how="gaussian")
    with pytest.raises(ValueError, match=r"receiver 'mlp1' is not a head"):
        P.path_patch(engine, clean, corrupted, metric, ["mlp1"])


# -- a metric that returns NaN raises, naming the prompt (issue 10) ------------------------------
def _nan_after(metric, calls: int, prompt: int):
    """``metric``, but NaN for ``prompt`` from its ``calls``-th call on (the unpatched runs come
    first, so ``calls=2`` gives NaN only in patched runs)."""
    seen = [0]

    def m(logits):
        out = metric(logits)
        seen[0] += 1
        if seen[0] > calls:
            out = out.clone()
            out[..., prompt] = float("nan")
        return out

    return m


@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_nan_in_a_patched_run_raises_naming_prompt_and_patch(rich, site):
    from mechtests.core.metrics import MetricError

    model, engine = rich
    clean, corrupted, metric = make_prompts(model.cfg.d_vocab, 3, 8, seed=3)
    with pytest.raises(MetricError, match=r"the metric returned nan for prompt 2 \('.+'\) after "
                                          r"patch \(\d+, \d+\) .*every value must be finite"):
        P.sweep(engine, site, clean, corrupted, _nan_after(metric, 2, prompt=2))


def test_nan_in_the_unpatched_run_raises_for_every_view(rich):
    from mechtests.core.metrics import MetricError

    model, engine = rich
    clean, corrupted, metric = make_prompts(model.cfg.d_vocab, 3, 8, seed=3)
    calls = [
        lambda m: P.sweep(engine, "resid_pre", clean, corrupted, m),
        lambda m: P.ablate(engine, clean, ["0.1", "1.2"], m),
        lambda m: P.ablate(engine, clean, ["0.1", "1.2"], m, together=True),
        lambda m: P.path_patch(engine, clean, corrupted, m, ["2.1"]),
        lambda m: P.attribution_patch(engine, "resid_pre", clean, corrupted, m),
    ]
    for call in calls:
        with pytest.raises(MetricError, match=r"returned nan for prompt 1 "):
            call(_nan_after(metric, 0, prompt=1))
    # the control: the same calls with the finite metric raise nothing
    for call in calls:
        assert torch.isfinite(call(metric).values).all()
