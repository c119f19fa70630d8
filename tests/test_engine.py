"""The engine's forward equals the TransformerBridge's, logits and every hook."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechtests.core.engine import SITE_PATTERNS, Engine
from mechtests.core.models import load_model
from mechtests.testing import save_rich_checkpoint


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    path = save_rich_checkpoint(tmp_path_factory.mktemp("rich") / "model")
    model = load_model(str(path), device="cpu")
    return model, Engine(model), path


def all_sites(n_layers: int) -> list[str]:
    return sorted({s.replace("L", str(layer)) for s in SITE_PATTERNS for layer in range(n_layers)})


def test_run_matches_bridge_logits_and_hooks(rich):
    model, engine, _ = rich
    tokens = torch.randint(2, model.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(1))
    sites = all_sites(model.cfg.n_layers)
    logits, acts = engine.run(tokens, sites)
    with torch.no_grad():
        ref, cache = model.run_with_cache(tokens)
    assert torch.allclose(logits, ref, atol=1e-5)
    checked = 0
    for name in sites:
        if name not in cache:  # hook names the bridge does not expose
            continue
        a, b = acts[name], cache[name]
        assert a.shape == b.shape, name
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), name
        assert torch.allclose(a[finite], b[finite], atol=1e-5), name
        checked += 1
    assert checked >= 15 * model.cfg.n_layers


def test_logits_at(rich):
    model, engine, _ = rich
    tokens = torch.randint(2, model.cfg.d_vocab, (2, 6))
    full, acts = engine.run(tokens)
    assert acts == {}
    last, _ = engine.run(tokens, logits_at=-1)
    some, _ = engine.run(tokens, logits_at=slice(2, 4))
    assert last.shape == (2, model.cfg.d_vocab) and some.shape == (2, 2, model.cfg.d_vocab)
    assert torch.allclose(last, full[:, -1], atol=1e-6)
    assert torch.allclose(some, full[:, 2:4], atol=1e-6)


def test_edits_match_transformer_lens_hooks(rich):
    model, engine, _ = rich
    tokens = torch.randint(2, model.cfg.d_vocab, (2, 7))

    def zero_head(z, hook=None):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    ours, _ = engine.run(tokens, edits={"blocks.1.attn.hook_z": zero_head})
    with torch.no_grad():
        ref = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
    assert torch.allclose(ours, ref, atol=1e-5)
    plain, _ = engine.run(tokens)
    assert not torch.allclose(ours, plain, atol=1e-3)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), p0=st.integers(0, 6), stage=st.integers(0, 6))
def test_windowed_forward_equals_full(rich, seed, p0, stage):
    """Starting at any stage, on positions p0.. with cached earlier keys/values, is exact."""
    model, engine, _ = rich
    n = engine.n_layers
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, model.cfg.d_vocab, (2, 7), generator=gen)
    stage = min(stage, 2 * n)
    names = [f"blocks.{la}.hook_resid_{w}" for la in range(n) for w in ("pre", "mid")]
    names += [f"blocks.{la}.attn.hook_{w}" for la in range(n) for w in "kv"]
    names += [f"blocks.{n - 1}.hook_resid_post"]
    _, acts = engine.run(tokens, names)
    layer, odd = divmod(stage, 2)
    start = acts[f"blocks.{n - 1}.hook_resid_post" if layer == n
                 else f"blocks.{layer}.hook_resid_{'mid' if odd else 'pre'}"]
    prefix = [(acts[f"blocks.{la}.attn.hook_k"][:, :p0], acts[f"blocks.{la}.attn.hook_v"][:, :p0])
              for la in range(n)]
    out = engine.forward(start[:, None, p0:], stage, p0=p0, prefix=prefix)
    full = engine.forward(engine.embed(tokens), 0)
    assert torch.allclose(out, full[:, :, p0:], atol=1e-5)
    read = torch.tensor([6, 6 - p0 // 2]) - p0
    narrow = engine.forward(start[:, None, p0:], stage, p0=p0, prefix=prefix, read=read)
    for i in range(2):
        if read[i] >= 0:
            assert torch.allclose(narrow[i, :, 0], full[i, :, p0 + read[i]], atol=1e-5)


def test_unknown_site_lists_valid_sites(rich):
    _, engine, _ = rich
    with pytest.raises(ValueError, match=r"unknown site 'blocks.0.hook_resid'.*hook_resid_pre"):
        engine.run(torch.tensor([[1, 2, 3]]), ["blocks.0.hook_resid"])
    with pytest.raises(ValueError, match=r"unknown site 'blocks.9.hook_resid_pre'.*L in 0..2"):
        engine.run(torch.tensor([[1, 2, 3]]), ["blocks.9.hook_resid_pre"])


def test_bad_tokens(rich):
    model, engine, _ = rich
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.run(torch.tensor([[1, model.cfg.d_vocab]]))
    with pytest.raises(ValueError, match="context"):
        engine.run(torch.ones(1, model.cfg.n_ctx + 1, dtype=torch.long))


def test_unsupported_architecture_is_named():
    cfg = types.SimpleNamespace(positional_embedding_type="rotary", normalization_type="RMS",
                                act_fn="silu", n_heads=4, n_key_value_heads=2,
                                architecture="LlamaForCausalLM", d_vocab=10)
    with pytest.raises(NotImplementedError, match=r"LlamaForCausalLM.*rotary.*RMS.*grouped-query"):
        Engine(types.SimpleNamespace(cfg=cfg))


def test_unprocessed_weights_fail_loudly(rich):
    """Without compatibility mode the LayerNorm weights are not folded: refuse, say why."""
    from transformer_lens.model_bridge import TransformerBridge

    _, _, path = rich
    raw = TransformerBridge.boot_transformers(str(path), device="cpu")
    raw.eval()
    with pytest.raises(ValueError, match="enable_compatibility_mode"):
        Engine(raw)


def test_fused_paths_equal_hooked_paths(rich):
    """Without hooks the engine takes fused kernels (F.layer_norm, scaled_dot_product_attention);
    asking for the scores and the norm's scale forces the hand-written path: same logits."""
    model, engine, _ = rich
    tokens = torch.randint(2, model.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(4))
    fast, _ = engine.run(tokens)
    slow, acts = engine.run(tokens, [f"blocks.{la}.{s}" for la in range(engine.n_layers)
                                     for s in ("attn.hook_pattern", "ln1.hook_scale")])
    assert len(acts) == 2 * engine.n_layers
    assert torch.allclose(fast, slow, atol=1e-5)


def test_unembed_columns_and_column_metrics(rich):
    """A metric that declares its columns gets exactly those logits; the sweep equals the same
    metric written as a plain function of the whole row."""
    from mechtests.analysis.patching import sweep
    from mechtests.core.metrics import logit_diff

    model, engine, _ = rich
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(2, model.cfg.d_vocab, (3, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 1) % model.cfg.d_vocab
    x = torch.randn(4, 3, engine.d_model, generator=g)
    ids = torch.tensor([[1, 5], [2, 3], [7, 0]])
    full = engine.unembed(x)
    assert torch.allclose(engine.unembed_columns(x, ids), full.gather(
        -1, ids.expand(4, 3, 2)), atol=1e-5)
    assert torch.allclose(engine.unembed_columns(x, ids[0]), full[..., ids[0]], atol=1e-5)
    with pytest.raises(ValueError, match="beyond the vocabulary"):
        engine.unembed_columns(x, torch.tensor([model.cfg.d_vocab]))
    metric = logit_diff(ids[:, 0], ids[:, 1])
    assert metric.reads.shape == (3, 2)
    plain = lambda lg: metric(lg)  # noqa: E731  (no .reads: the whole row)
    for site in ("resid_pre", "z"):
        a, b = sweep(engine, site, clean, corrupted, metric), sweep(engine, site, clean,
                                                                   corrupted, plain)
        assert torch.allclose(a.per_prompt, b.per_prompt, atol=1e-5)
        assert a.per_prompt.abs().max() > 1e-3


def test_a_hooked_window_caches_only_its_own_rows(rich):
    """In forward_wave a hooked window's projections share matmuls with the other windows; what
    its hooks cache (k is a view of the fused projection) equals a lone run's and holds only its
    own rows, not the other windows' (which would keep every layer's whole batch alive)."""
    from mechtests.core.engine import Ctx, Window

    model, engine, _ = rich
    tokens = torch.randint(2, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    names = {f"blocks.{la}.attn.hook_k" for la in range(engine.n_layers)}
    names.add("blocks.0.hook_mlp_out")
    _, alone = engine.run(tokens, names)
    ctx = Ctx(set(names))
    others = Window(0, [], None, {0: engine.embed(tokens.repeat(20, 1))})
    engine.forward_wave([Window(0, [], None, {0: engine.embed(tokens, ctx)}, ctx), others])
    for name in names:
        got = ctx.cache[name]
        assert torch.allclose(got, alone[name], atol=1e-5), name
        assert got.untyped_storage().nbytes() <= 3 * got.numel() * got.element_size(), name
