"""Gemma 3 in the engine: exact against a fresh Hugging Face model and a hook loop, or refused.

A tiny random ``Gemma3ForCausalLM`` built offline (3 layers: sliding-window, global,
sliding-window; a window of 4 tokens, so every prompt here but the shortest is longer than it;
its own rotary base on each kind of layer, linear rope scaling on the global one;
``query_pre_attn_scalar`` apart from ``head_dim``; two query heads per key-value head; weights at
std 0.25 and norm gains ``1 + w`` perturbed, as ``tests/test_architectures.py`` does for the other
families). What is exact: logits (fused and hand-written attention), every hook against the
TransformerBridge's, windowed forwards from any stage and position, every sweep site against a
hook loop (a head's or neuron's patch recomputing its layer's post-norm) and the residual stream
against Hugging Face's own layer hooks, single-head and single-neuron ablations and path
patching against Hugging Face's forward with its ``o_proj`` / ``down_proj`` / ``q_proj``
hooked, the DLA of residual components and the logit lens, head and neuron DLA as shares that
add up to their layer's. What is refused, saying why: reading ``W_O`` / ``W_out`` as writes
(the norm-weighted pattern, the OV circuit). ``--mutate``'s Gemma 3 mutants. Marked heavy: the
real Gemma 3 270M (``--model gemma3-270m``).
"""

from __future__ import annotations

import pytest
import torch

from mechtests.analysis import patching
from mechtests.analysis.attribution import (
    head_attribution,
    logit_attribution,
    logit_lens,
    neuron_attribution,
    neuron_output_norms,
    unembed_null_fraction,
)
from mechtests.core.engine import VERIFY_RTOL, Ctx, Engine, UnsupportedArchitecture
from mechtests.core.models import load_model
from mechtests.testing import SWEEP_CASES, engine_hook_loop, hf_resid_pre_loop

ATOL = 1e-4
WINDOW = 4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def save_tiny_gemma3(path, seed: int = 0, init: float = 0.25, **overrides):
    """A tiny random Gemma 3 (``Gemma3ForCausalLM``) with a word-level tokenizer, saved as
    safetensors: weights at std ``init``, norm weights ``w`` at std 0.3 (gains ``1 + w``)."""
    import transformers as tf

    from mechtests.testing import WORDS, word_tokenizer

    tok = word_tokenizer(WORDS)
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
              num_hidden_layers=len(LAYER_TYPES), num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, query_pre_attn_scalar=16, max_position_embeddings=64,
              sliding_window=WINDOW, layer_types=LAYER_TYPES,
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                               "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                  "rope_theta": 10_000.0}},
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            scale = init if p.dim() >= 2 else 0.3
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = save_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "m")
    model = load_model(str(path), device="cpu")
    return path, model, Engine(model)


def _tokens(engine, seed=0, n=2, T=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, engine.d_vocab, (n, T), generator=g)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()


def test_what_the_engine_reads(gemma):
    _, model, engine = gemma
    assert engine.family == "gemma3_text" and engine.architecture == "Gemma3ForCausalLM"
    assert engine.windows == [WINDOW, None, WINDOW]
    assert engine.rope_kinds == LAYER_TYPES
    assert engine.scale == 16 ** -0.5 and engine.group == 2 and engine.gated
    assert engine.verified["hf_max_err"] < ATOL
    hf = _hf(gemma[0])
    emb = hf.model.embed_tokens
    assert torch.equal(engine.W_E, emb.weight * emb.embed_scale.to(emb.weight.dtype))


@pytest.mark.parametrize("T", [3, 12])
@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "hand-written"])
def test_logits_match_fresh_hugging_face_model(gemma, T, hooked):
    """Shorter and longer than the sliding window; fused attention and the hand-written one
    (asked for its pattern), whose patterns equal Hugging Face's eager attention weights."""
    path, _, engine = gemma
    hf = _hf(path)
    tokens = _tokens(engine, seed=3, n=3, T=T)
    sites = [f"blocks.{la}.attn.hook_pattern" for la in range(engine.n_layers)] if hooked else []
    ours, acts = engine.run(tokens, sites)
    with torch.no_grad():
        ref = hf(tokens, output_attentions=hooked)
    assert ref.logits.abs().max() > 2  # the check is not on near-zero logits
    assert (ours - ref.logits).abs().max() < ATOL
    for la, s in enumerate(sites):
        assert (acts[s] - ref.attentions[la]).abs().max() < 1e-5
        if T > WINDOW and engine.windows[la]:  # the window really cuts keys off
            assert (acts[s][:, :, -1, :T - WINDOW] == 0).all()


def test_every_hook_is_the_bridges(gemma):
    """TransformerLens names under the post-norms: hook_attn_out / hook_mlp_out after
    post_attention_layernorm / post_feedforward_layernorm (the bridge's ``ln1_post.hook_out``),
    hook_embed scaled; hook_q / hook_k after the q/k norm (the bridge's ``hook_q_normed``)."""
    path, _, engine = gemma
    bridge = load_model(str(path), device="cpu", compat=False)
    tokens = _tokens(engine, seed=1, T=9)
    sites = sorted({s.replace("L", str(la)) for s in engine.sites
                    for la in range(engine.n_layers)})
    _, acts = engine.run(tokens, sites)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
    checked = 0
    for name in sites:
        ref = cache[name]
        if name.endswith(("attn.hook_q", "attn.hook_k")):
            ref = cache[name + "_normed"].transpose(1, 2)
        if name.endswith("hook_attn_scores"):  # HF masks with the dtype's minimum, TL with -inf
            ref = ref.masked_fill(ref == torch.finfo(ref.dtype).min, float("-inf"))
        a = acts[name]
        assert a.shape == ref.shape, name
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(a)), name
        assert (a[finite] - ref[finite]).abs().max() < 1e-5, name
        checked += 1
    assert checked == len(sites) >= 18 * engine.n_layers
    post = bridge.blocks[1].ln1_post.original_component
    raw = cache["blocks.1.attn.hook_out"]
    assert (acts["blocks.1.hook_attn_out"] - post(raw)).abs().max() < 1e-5
    assert (acts["blocks.1.hook_attn_out"] - raw).abs().max() > 0.1  # the norm does something


@pytest.mark.parametrize("p0", [0, 2, 5, 8])
def test_windowed_forward_equals_full_past_the_window(gemma, p0):
    """From every stage, on positions p0.. with the cached keys and values before p0 (masked by
    the sliding window as the full forward masks them), and read at one position: exact."""
    _, _, engine = gemma
    n = engine.n_layers
    tokens = _tokens(engine, seed=7, T=11)
    names = [f"blocks.{la}.hook_resid_{w}" for la in range(n) for w in ("pre", "mid")]
    names += [f"blocks.{la}.attn.hook_{w}" for la in range(n) for w in "kv"]
    names += [f"blocks.{n - 1}.hook_resid_post"]
    patterns = [f"blocks.{la}.attn.hook_pattern" for la in range(n)]
    _, acts = engine.run(tokens, names + patterns)
    full = engine.forward(engine.embed(tokens), 0)
    prefix = [(acts[f"blocks.{la}.attn.hook_k"][:, :p0], acts[f"blocks.{la}.attn.hook_v"][:, :p0])
              for la in range(n)]
    for stage in range(2 * n + 1):
        layer, odd = divmod(stage, 2)
        start = acts[f"blocks.{n - 1}.hook_resid_post" if layer == n
                     else f"blocks.{layer}.hook_resid_{'mid' if odd else 'pre'}"]
        out = engine.forward(start[:, None, p0:], stage, p0=p0, prefix=prefix)
        assert (out - full[:, :, p0:]).abs().max() < 1e-5, stage
        ctx = Ctx(set(patterns[layer:]))  # the hand-written attention, its scores hooked
        out = engine.forward(start[:, None, p0:], stage, p0=p0, prefix=prefix, ctx=ctx)
        assert (out - full[:, :, p0:]).abs().max() < 1e-5, stage
        for name in ctx.cache:
            assert (ctx.cache[name] - acts[name][:, :, p0:]).abs().max() < 1e-6, name
        read = torch.tensor([10, 10 - p0 // 2]) - p0
        for ctx in (None, Ctx(set(patterns[layer:]))):
            narrow = engine.forward(start[:, None, p0:], stage, p0=p0, prefix=prefix, read=read,
                                    ctx=ctx)
            for i in range(2):
                if read[i] >= 0:  # a read position inside the window
                    assert (narrow[i, :, 0] - full[i, :, p0 + read[i]]).abs().max() < 1e-5


# -- sweeps ---------------------------------------------------------------------------------
def METRIC(lg):
    return lg[..., 3] - lg[..., 5]


def _pair(engine, T=9):
    clean = _tokens(engine, seed=1, T=T)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 7) % engine.d_vocab
    corrupted[:, 6] = (clean[:, 6] + 3) % engine.d_vocab
    return clean, corrupted


@pytest.mark.parametrize("site,by", SWEEP_CASES,
                         ids=[f"{s}-{'/'.join(b)}" for s, b in SWEEP_CASES])
def test_sweep_equals_hook_loop(gemma, site, by):
    """Every sweep site, prompts of 9 tokens, windows of 4: patches at positions 0..8 are read
    at 8, through windows whose cached keys fall partly outside the sliding window. A head's
    or neuron's patch goes through its layer's post-norm (recomputed on the base run's branch
    output plus the change); the reference is a full forward per cell with the hook edited."""
    _, _, engine = gemma
    clean, corrupted = _pair(engine)
    res = patching.sweep(engine, site, clean, corrupted, METRIC, by=by)
    ref = engine_hook_loop(engine, site, by, clean, corrupted, METRIC)
    assert res.per_prompt.shape == ref.shape
    base = torch.tensor(res.meta["corrupted_per_prompt"]).view(-1, *[1] * (ref.dim() - 1))
    if site not in patching.RESID_SITES or "pos" in by:
        assert (ref - base).abs().max() > 0.05, f"{site}: effects too small to test"
    assert (res.per_prompt - ref).abs().max() < ATOL


def _zeroing(module, sl):
    """A forward pre-hook zeroing a slice of ``module``'s input's last axis."""
    def pre(_, args):
        x = args[0].clone()
        x[..., sl] = 0
        return (x, *args[1:])
    return module.register_forward_pre_hook(pre)


def test_single_head_and_neuron_ablations_equal_hugging_face(gemma):
    """Zero-ablating one head or one neuron, one at a time, against the checkpoint's own
    Hugging Face forward with that head's slice of ``o_proj``'s input (or that neuron of
    ``down_proj``'s) zeroed, so HF applies its post-norm to what is left: nothing of the
    engine is in the reference."""
    path, _, engine = gemma
    hf = _hf(path)
    clean, _ = _pair(engine)
    dh = engine.d_head
    heads = [f"{la}.{h}" for la in range(engine.n_layers) for h in range(engine.n_heads)]
    neurons = [f"mlp{la}.{n}" for la in range(engine.n_layers) for n in (0, 7, 30)]
    res = patching.ablate(engine, clean, heads + neurons, METRIC)
    refs = []
    for comp in heads + neurons:
        if comp.startswith("mlp"):
            la, n = map(int, comp[3:].split("."))
            handle = _zeroing(hf.model.layers[la].mlp.down_proj, slice(n, n + 1))
        else:
            la, h = map(int, comp.split("."))
            handle = _zeroing(hf.model.layers[la].self_attn.o_proj, slice(h * dh, (h + 1) * dh))
        try:
            with torch.no_grad():
                refs.append(METRIC(hf(clean).logits[:, -1]))
        finally:
            handle.remove()
    ref = torch.stack(refs, 1)
    clean_metric = torch.tensor(res.meta["clean_per_prompt"])[:, None]
    assert (ref - clean_metric).abs().max() > 0.05              # ablations move the metric
    assert (res.per_prompt - ref).abs().max() < ATOL


def test_ablating_together_equals_an_edited_run(gemma):
    """``ablate(..., together=True)`` runs the full forward with the edits: it equals an edited
    ``Engine.run``; layer outputs (attn1, mlp1) ablate one by one as the hook loop does."""
    _, _, engine = gemma
    clean, _ = _pair(engine)

    def zero(idx):
        def edit(a):
            a = a.clone()
            a[idx] = 0
            return a
        return edit

    res = patching.ablate(engine, clean, ["1.0", "mlp1.3"], METRIC, together=True)
    lg, _ = engine.run(clean, logits_at=-1, edits={
        "blocks.1.attn.hook_z": zero((slice(None), slice(None), 0)),
        "blocks.1.mlp.hook_post": zero((slice(None), slice(None), 3))})
    assert (res.per_prompt[:, 0] - METRIC(lg)).abs().max() < ATOL
    res = patching.ablate(engine, clean, ["attn1", "mlp1"], METRIC)
    for j, name in enumerate(["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]):
        lg, _ = engine.run(clean, logits_at=-1, edits={name: zero((slice(None),))})
        assert (res.per_prompt[:, j] - METRIC(lg)).abs().max() < ATOL


def test_resid_pre_sweep_equals_hugging_face_hooks(gemma):
    """The residual-stream sweep against the checkpoint's own Hugging Face forward (a pre-hook
    on decoder layer L replacing position p of its input with the clean run's): nothing of the
    engine is in the reference."""
    path, _, engine = gemma
    hf = _hf(path)
    clean, corrupted = _pair(engine)
    ours = patching.sweep(engine, "resid_pre", clean, corrupted, METRIC, by=("layer", "pos"))
    ref = hf_resid_pre_loop(hf, hf.model.layers, clean, corrupted, METRIC)
    assert (ref - ref[:, :, :1]).abs().max() > 0.05           # patches move the metric
    assert (ours.per_prompt - ref).abs().max() < ATOL


# -- attribution views ------------------------------------------------------------------------
def test_residual_attribution_adds_up_through_the_post_norms(gemma):
    """hook_attn_out and hook_mlp_out are after the post-norms, what joins the residual stream:
    embed + attn_L + mlp_L through the final norm is the logit difference, and the logit lens's
    final entry is it (RMSNorm: nothing is centred)."""
    _, model, engine = gemma
    tokens = _tokens(engine, seed=4, n=3, T=7)
    a, c = torch.tensor([3, 4, 6]), torch.tensor([5, 8, 9])
    logits, _ = engine.run(tokens, logits_at=-1)
    truth = logits.gather(-1, a[:, None])[:, 0] - logits.gather(-1, c[:, None])[:, 0]
    assert truth.abs().max() > 0.5
    dla = logit_attribution(model, tokens, a, c)
    assert dla.labels["component"][:2] == ["embed", "attn_0"]
    total = dla.per_prompt.sum(1) + torch.tensor(dla.meta["b_U"])
    assert (total - truth).abs().max() < ATOL
    for recompute in (True, False):
        lens = logit_lens(model, tokens, a, c, recompute_ln=recompute)
        assert (lens.per_prompt[:, -1] - truth).abs().max() < ATOL


def test_head_and_neuron_attribution_are_shares_that_add_up(gemma):
    """Past a post-norm a head's (neuron's) attribution is its ``z @ W_O`` (``post * W_out``)
    times the factor the norm applied in this run: the heads of a layer plus its bias term are
    that layer's ``attn_L`` attribution, the neurons plus theirs its ``mlp_L``, to 1e-4."""
    _, model, engine = gemma
    tokens = _tokens(engine, seed=4, n=3, T=7)
    a, c = torch.tensor([3, 4, 6]), torch.tensor([5, 8, 9])
    dla = logit_attribution(model, tokens, a, c)
    comp = dla.labels["component"]
    for view, kind, bias in ((head_attribution, "attn", "b_O"),
                             (neuron_attribution, "mlp", "b_out")):
        parts = view(model, tokens, a, c)
        per_layer = parts.per_prompt.sum(2) + torch.tensor(parts.meta[bias])
        whole = dla.per_prompt[:, [comp.index(f"{kind}_{la}") for la in range(engine.n_layers)]]
        assert whole.abs().max() > 0.1
        assert (per_layer - whole).abs().max() < ATOL, kind


def test_neuron_output_norms_read_through_the_post_norm_gain(gemma):
    """Each neuron's row of ``down_proj`` times the post-feedforward norm's gain ``1 + w``,
    read off the Hugging Face model (what the neuron writes per unit of activation, up to the
    ``1/rms`` shared by every neuron of its layer); its null-space fraction is scale-free."""
    path, model, engine = gemma
    hf = _hf(path)
    rows = torch.stack([layer.mlp.down_proj.weight.T * (1 + layer.post_feedforward_layernorm
                                                         .weight) for layer in hf.model.layers])
    norms = neuron_output_norms(model).values
    assert (norms - rows.norm(dim=-1)).abs().max() < 1e-5
    frac = unembed_null_fraction(model).values
    assert ((frac >= 0) & (frac <= 1)).all()
    assert not torch.allclose(norms, hf.model.layers[0].mlp.down_proj.weight.T.norm(dim=-1))


def test_views_reading_w_o_as_a_write_are_refused_saying_why(gemma):
    """The norm-weighted pattern (``||alpha v W_O||``) and the OV circuit take ``W_O`` as what a
    head writes: past the post-norm it is not, and they say so."""
    from mechtests.analysis.heads import head_scores, ov_circuit

    _, model, engine = gemma
    tokens = _tokens(engine, seed=2, n=1, T=8)
    why = r"Gemma3ForCausalLM: a head's z @ W_O is not what it adds.*post_attention_layernorm"
    with pytest.raises(UnsupportedArchitecture, match=why):
        head_scores(model, tokens, "previous_token", weighting="norm")
    with pytest.raises(UnsupportedArchitecture, match=why):
        ov_circuit(model, 1, 0, [1, 2, 3])
    with pytest.raises(UnsupportedArchitecture, match="W_out_raw"):
        engine.W_out  # noqa: B018 - the property raises


def test_path_patching_through_the_post_norm_and_q_norm_equals_hugging_face(gemma):
    """Sender 0.1's clean-minus-corrupted output, through layer 0's post-norm (the other heads
    at their corrupted values), added only to the input of receiver 2.0's query, which goes
    through the q norm: against Hugging Face's forward on the corrupted prompts with a hook on
    layer 2's ``q_proj`` (the receiver's slice recomputed from ``input_layernorm`` of the
    layer's input plus that write); nothing of the engine is in the reference. Keys and values
    are shared by query heads here (grouped-query attention), which path patching refuses."""
    path, _, engine = gemma
    hf = _hf(path)
    clean, corrupted = _pair(engine)
    ours = patching.path_patch(engine, clean, corrupted, METRIC, ["2.0"], component="q")
    layers, dh = hf.model.layers, engine.d_head
    grabbed = {}

    def grab(key):
        def pre(_, args, kwargs):
            grabbed[key] = (args[0] if args else kwargs["hidden_states"]).clone()
        return pre

    o_proj, attn0 = layers[0].self_attn.o_proj, layers[0]
    for prompt in ("clean", "corrupted"):
        h = o_proj.register_forward_pre_hook(lambda m, a, k=prompt: grabbed.update({k: a[0]}))
        with torch.no_grad():
            hf(clean if prompt == "clean" else corrupted)
        h.remove()
    z_base, z_src = grabbed["corrupted"], grabbed["clean"].clone()
    mixed = z_base.clone()
    mixed[..., dh:2 * dh] = z_src[..., dh:2 * dh]
    with torch.no_grad():
        post = attn0.post_attention_layernorm
        write = post(o_proj(mixed)) - post(o_proj(z_base))

    def q_hook(module, args, out):
        x = grabbed["resid_pre_2"] + write
        new = torch.nn.functional.linear(layers[2].input_layernorm(x), module.weight,
                                         module.bias)
        out = out.clone()
        out[..., :dh] = new[..., :dh]
        return out

    handles = [layers[2].register_forward_pre_hook(grab("resid_pre_2"), with_kwargs=True)]
    q_proj = layers[2].self_attn.q_proj
    handles.append(q_proj.register_forward_hook(q_hook))
    try:
        with torch.no_grad():
            ref = METRIC(hf(corrupted).logits[:, -1])
    finally:
        for h in handles:
            h.remove()
    base = torch.tensor(ours.meta["corrupted_per_prompt"])
    assert (ref - base).abs().max() > 0.01, "the path changes too little to test"
    assert (ours.per_prompt[:, 0, 1] - ref).abs().max() < ATOL
    assert (ours.per_prompt[:, 2] - base[:, None]).abs().max() < ATOL  # senders after: nothing
    with pytest.raises(UnsupportedArchitecture, match="grouped-query"):
        patching.path_patch(engine, clean, corrupted, METRIC, ["1.0"], component="k")


# -- --mutate on Gemma 3 ------------------------------------------------------------------------
def test_mutants_of_gemma3_edit_what_they_name(gemma):
    """``--mutate`` builds Gemma 3 mutants through Llama's names (``Gemma3Layout``): a relabel
    within key-value groups keeps the function; breaking a head's QK makes it attend uniformly
    (a zero query stays zero through the q norm), breaking its OV zeroes its columns of
    ``o_proj`` and no other head's; perturbing the unnamed leaves the named head as it was. Each
    mutant's engine checks itself against the edited Hugging Face model."""
    from mechtests.core.engine import engine_for
    from mechtests.core.models import reference_of
    from mechtests.suite import mutate as mu

    path, model, engine = gemma
    tokens = _tokens(engine, seed=5, n=1, T=8)
    dh, H = engine.d_head, engine.n_heads
    old = _hf(path).state_dict()
    relabel = mu.build_mutant(model, mu.Mutant("relabel", "same", mu.relabel))
    a, _ = engine.run(tokens)
    b, _ = engine_for(relabel).run(tokens)
    assert a.abs().max() > 1 and (a - b).abs().max() < 1e-5
    new = reference_of(relabel).state_dict()
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(new[q][:dh], old[q][dh:2 * dh])  # new head 0 is old head 1 (group 0)
    assert mu.relabelled("1.0", engine.n_layers, H, engine.n_kv_heads) == "1.1"

    name = "blocks.1.attn.hook_pattern"  # layer 1 is global: uniform over the causal prefix
    qk = mu.build_mutant(model, mu.Mutant("QK 1.2", "fail", mu.break_qk("1.2")))
    _, acts = engine_for(qk).run(tokens, [name])
    _, clean = engine.run(tokens, [name])
    uniform = torch.tril(torch.ones(8, 8)) / torch.arange(1, 9)[:, None]
    assert torch.allclose(acts[name][0, 2], uniform, atol=1e-6)
    assert not torch.allclose(clean[name][0, 2], uniform, atol=1e-2)
    assert torch.allclose(acts[name][0, 0], clean[name][0, 0], atol=1e-6)

    ov = mu.build_mutant(model, mu.Mutant("OV 1.2", "fail", mu.break_ov("1.2")))
    w = engine_for(ov).W_O_raw
    assert float(w[1, 2].abs().max()) == 0 and float(w[1, 1].abs().max()) > 0

    unnamed = mu.build_mutant(model, mu.Mutant("unnamed", "hold", mu.perturb_unnamed(["1.2"])))
    new = reference_of(unnamed).state_dict()
    o = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(new[o][:, 2 * dh:3 * dh], old[o][:, 2 * dh:3 * dh])
    assert not torch.equal(new[o][:, :dh], old[o][:, :dh])


# -- what is refused at build ------------------------------------------------------------------
@pytest.mark.parametrize("overrides,named", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                          "full_attention": {"rope_type": "dynamic", "factor": 2.0,
                                             "rope_theta": 10_000.0}}},
     "rope_type='dynamic'"),
])
def test_what_gemma3_cannot_do_exactly_is_refused(tmp_path, overrides, named):
    model = load_model(str(save_tiny_gemma3(tmp_path / "m", **overrides)), device="cpu")
    with pytest.raises(UnsupportedArchitecture, match=rf"Gemma3ForCausalLM: it has .*{named}"):
        Engine(model)


def test_bfloat16_builds_within_its_tolerance(gemma):
    """The embedding scale is rounded to bfloat16 as HF rounds it; the build's own check
    against the bfloat16 Hugging Face model passes at the dtype's tolerance."""
    engine = Engine(load_model(str(gemma[0]), device="cpu", dtype="bfloat16"))
    assert engine.dtype == torch.bfloat16
    assert 0 < engine.verified["hf_max_err"] <= engine.verified["tolerance"]
    assert engine.verified["tolerance"] >= VERIFY_RTOL[torch.bfloat16]


# -- the real Gemma 3 270M (heavy: a 250 MB GGUF converted once to 1.07 GB, ~4 min) ---------
@pytest.fixture(scope="module")
def gemma3_270m():
    from mechtests.core.models import resolve

    return resolve("gemma3-270m").path


@pytest.mark.heavy
def test_real_gemma3_270m_is_exact(gemma3_270m):
    """The converted 270M through every check; the engine against Hugging Face at 1e-4 of the
    logits' scale (the build's comparison), on a prompt past the 512-token sliding window too;
    and an attn_out sweep past the window against the hook loop."""
    import json

    from transformers import AutoTokenizer

    from mechtests.core.real_models import PROVENANCE, REAL_MODELS

    record = json.loads((gemma3_270m / PROVENANCE).read_text())
    assert record["gguf_sha256"] == REAL_MODELS["gemma3-270m"].sha256
    assert record["dequantized_from"] == "Q4_K_M"
    tok = AutoTokenizer.from_pretrained(gemma3_270m)
    model = load_model("gemma3-270m", device="cpu")
    engine = Engine(model)
    c = model.cfg
    assert (c.n_layers, c.n_heads, c.d_model, c.d_vocab) == (18, 4, 640, 262144)
    assert engine.windows.count(None) == 3 and set(engine.windows) == {512, None}
    hf = _hf(gemma3_270m)
    ioi = tok("When Mary and John went to the store, John gave a drink to",
              return_tensors="pt").input_ids
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)
    long = tok(text, return_tensors="pt").input_ids[:, :530]
    assert long.shape[1] == 530 > 512
    for tokens in (ioi, long):
        ours, _ = engine.run(tokens, logits_at=slice(-20, None))
        with torch.no_grad():
            ref = hf(tokens, logits_to_keep=20).logits
        scale = max(1.0, ref.abs().max().item())
        assert ref.abs().max() > 2
        assert (ours - ref).abs().max() < 1e-4 * scale
    assert tok.decode(ref[0, -1].argmax()) != "" and tok.decode(
        hf(ioi).logits[0, -1].argmax()) == " Mary"
    # a sweep site against the hook loop, past the window: layers 0 (sliding) and 5 (global)
    clean = long
    corrupted = clean.clone()
    corrupted[:, 520] = tok(" cat").input_ids[-1]
    fox, dog = tok(" fox").input_ids[-1], tok(" dog").input_ids[-1]
    metric = lambda lg: lg[..., fox] - lg[..., dog]  # noqa: E731
    layers, positions = [0, 5], [519, 520, 529]
    res = patching.sweep(engine, "attn_out", clean, corrupted, metric, by=("layer", "pos"),
                         layers=layers, positions=positions)
    names = [f"blocks.{la}.hook_attn_out" for la in layers]
    _, src = engine.run(clean, names)
    for i in range(len(layers)):
        for j, p in enumerate(positions):
            def edit(act, name=names[i], p=p):
                act = act.clone()
                act[:, p] = src[name][:, p]
                return act
            lg, _ = engine.run(corrupted, edits={names[i]: edit}, logits_at=-1)
            assert (res.per_prompt[0, i, j] - metric(lg)[0]).abs() < 1e-4 * scale
