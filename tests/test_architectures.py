"""Every family the engine runs is exact against a fresh Hugging Face model and a hook loop.

Tiny random checkpoints (``save_arch_checkpoint``) with weights drawn at std 0.25 and perturbed
norms and biases, so logits and patching effects are O(1-10): at GPT-2's 0.02 init every effect
is ~1e-3 and agreement at 1e-4 would prove little. Each sweep site is compared, cell by cell,
with a loop that patches one cell per forward through ``Engine.run``'s edits (the TL-hook way),
which shares none of the sweep's batching, windowing, stage entry or head recomputation.
"""

from __future__ import annotations

import pytest
import torch

from mechtests.analysis import patching
from mechtests.analysis.attribution import head_attribution, logit_attribution, logit_lens
from mechtests.core.engine import Engine, UnsupportedArchitecture
from mechtests.core.models import load_model
from mechtests.testing import (
    SWEEP_CASES,
    engine_hook_loop,
    hf_resid_pre_loop,
    save_arch_checkpoint,
)

ARCHS = ("neox", "neox_serial", "gptj", "llama", "qwen2", "qwen3")
ATOL = 1e-4


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    path = save_arch_checkpoint(tmp_path_factory.mktemp(request.param) / "m", request.param)
    model = load_model(str(path), device="cpu")
    return request.param, path, model, Engine(model)


def _tokens(engine, seed=0, n=2, T=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, engine.d_vocab, (n, T), generator=g)


def test_logits_match_fresh_hugging_face_model(arch):
    from transformers import AutoModelForCausalLM

    _, path, _, engine = arch
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tokens = _tokens(engine, seed=3, n=3, T=12)
    ours, _ = engine.run(tokens)
    with torch.no_grad():
        ref = hf(tokens).logits
    assert ref.abs().max() > 2  # the check is not on near-zero logits
    assert (ours - ref).abs().max() < ATOL


METRIC = staticmethod(lambda lg: lg[..., 3] - lg[..., 5])


@pytest.mark.parametrize("site,by", SWEEP_CASES,
                         ids=[f"{s}-{'/'.join(b)}" for s, b in SWEEP_CASES])
def test_sweep_equals_hook_loop(arch, site, by):
    name, _, _, engine = arch
    clean = _tokens(engine, seed=1)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 7) % engine.d_vocab
    corrupted[:, 4] = (clean[:, 4] + 3) % engine.d_vocab
    metric = lambda lg: lg[..., 3] - lg[..., 5]  # noqa: E731
    if site == "resid_mid" and engine.parallel:
        with pytest.raises(UnsupportedArchitecture, match="parallel attention and MLP"):
            patching.sweep(engine, site, clean, corrupted, metric, by=by)
        return
    res = patching.sweep(engine, site, clean, corrupted, metric, by=by)
    ref = engine_hook_loop(engine, site, by, clean, corrupted, metric)
    assert res.per_prompt.shape == ref.shape
    base = res.meta["corrupted_per_prompt"]
    effect = (ref - torch.tensor(base).view(-1, *[1] * (ref.dim() - 1))).abs().max()
    if site not in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out") \
            or "pos" in by:
        assert effect > 0.05, f"{name} {site}: effects too small ({effect:.3g}) to test"
    assert (res.per_prompt - ref).abs().max() < ATOL, name


def test_resid_pre_sweep_equals_hugging_face_hooks(arch):
    """The residual-stream sweep against the checkpoint's own Hugging Face forward: one forward
    per cell, a pre-hook on decoder layer L replacing position p of its input with the clean
    run's (``output_hidden_states``). Nothing of the engine is in the reference."""
    from transformers import AutoModelForCausalLM

    _, path, _, engine = arch
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    layers = next(m for m in hf.modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == engine.n_layers)
    clean = _tokens(engine, seed=1)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 7) % engine.d_vocab
    ours = patching.sweep(engine, "resid_pre", clean, corrupted, METRIC, by=("layer", "pos"))
    ref = hf_resid_pre_loop(hf, layers, clean, corrupted, METRIC)
    assert (ref - ref[:, :, :1]).abs().max() > 0.05           # patches move the metric
    assert (ours.per_prompt - ref).abs().max() < ATOL


def test_attribution_views_add_up_to_the_metric(arch):
    """DLA components + b_U give the true logit difference, and the logit lens's final entry
    is it, on LayerNorm and RMSNorm models alike (RMSNorm does not centre)."""
    _, _, model, engine = arch
    tokens = _tokens(engine, seed=4, n=3, T=7)
    a, c = torch.tensor([3, 4, 6]), torch.tensor([5, 8, 9])
    logits, _ = engine.run(tokens, logits_at=-1)
    truth = logits.gather(-1, a[:, None])[:, 0] - logits.gather(-1, c[:, None])[:, 0]
    assert truth.abs().max() > 0.5
    dla = logit_attribution(model, tokens, a, c)
    total = dla.per_prompt.sum(1) + torch.tensor(dla.meta["b_U"])
    assert (total - truth).abs().max() < ATOL
    heads = head_attribution(model, tokens, a, c)
    per_layer = heads.per_prompt.sum(2) + torch.tensor(heads.meta["b_O"])
    attn = dla.per_prompt[:, [dla.labels["component"].index(f"attn_{la}")
                              for la in range(engine.n_layers)]]
    assert (per_layer - attn).abs().max() < ATOL
    lens = logit_lens(model, tokens, a, c)
    assert (lens.per_prompt[:, -1] - truth).abs().max() < ATOL


def test_path_patching_refuses_what_it_lacks(arch):
    _, _, _, engine = arch
    clean = _tokens(engine, seed=1)
    corrupted = (clean + 1) % engine.d_vocab
    metric = lambda lg: lg[..., 3] - lg[..., 5]  # noqa: E731
    if engine.group > 1:
        with pytest.raises(UnsupportedArchitecture, match="grouped-query"):
            patching.path_patch(engine, clean, corrupted, metric, ["1.0"], component="k")
    elif engine.q_norm is None:
        res = patching.path_patch(engine, clean, corrupted, metric, ["1.0"], component="k")
        assert res.per_prompt.shape[1:] == (engine.n_layers, engine.n_heads)


# -- refusals: never a silently wrong number ----------------------------------------------------
def _save(path, model):
    from mechtests.testing import WORDS, word_tokenizer

    model.save_pretrained(path)
    word_tokenizer(WORDS).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    path = save_arch_checkpoint(tmp_path_factory.mktemp("gemma2") / "m", "gemma2")
    return load_model(str(path), device="cpu")


def test_gemma2_every_view_refuses_naming_what_it_has(gemma2):
    from mechtests.analysis.heads import head_scores, induction_scores
    from mechtests.core.engine import engine_for

    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    a, c = torch.tensor([3]), torch.tensor([5])
    views = [lambda: Engine(gemma2), lambda: engine_for(gemma2),
             lambda: logit_attribution(gemma2, tokens, a, c),
             lambda: head_attribution(gemma2, tokens, a, c),
             lambda: logit_lens(gemma2, tokens, a, c),
             lambda: head_scores(gemma2, tokens, "previous_token"),
             lambda: induction_scores(gemma2, n_tokens=4, batch=1)]
    for view in views:
        with pytest.raises(UnsupportedArchitecture,
                           match=r"Gemma2ForCausalLM.*softcapping.*sliding_window.*runs GPT-2"):
            view()


def test_gpt2_unscaled_attention_is_refused(tmp_path):
    """``scale_attn_weights=False``: the bridge scales anyway (logits off by ~3); refused."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     scale_attn_weights=False, bos_token_id=0, eos_token_id=0)
    model = load_model(str(_save(tmp_path / "m", GPT2LMHeadModel(cfg))), device="cpu")
    with pytest.raises(UnsupportedArchitecture, match="scale_attn_weights=False"):
        Engine(model)


def test_bridge_that_disagrees_with_hugging_face_is_refused(tmp_path, monkeypatch):
    """Without the named check, the self-check against a fresh HF model still refuses it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechtests.core import engine as engine_mod

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     scale_attn_weights=False, bos_token_id=0, eos_token_id=0,
                     initializer_range=0.3)
    model = load_model(str(_save(tmp_path / "m", GPT2LMHeadModel(cfg))), device="cpu")
    monkeypatch.setattr(engine_mod, "_check_architecture", lambda cfg, hf=None: None)
    with pytest.raises(engine_mod.EngineMismatch, match="bridge disagrees with the Hugging Face"):
        Engine(model)


def test_opt_projected_embedding_is_refused(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=40, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=16)
    model = load_model(str(_save(tmp_path / "m", OPTForCausalLM(cfg))), device="cpu")
    with pytest.raises(UnsupportedArchitecture, match="projected embedding.*opt-350m"):
        Engine(model)


def test_induction_exists_runs_on_pythia_and_llama_and_skips_gemma2(tmp_path):
    """The claim meant for any model measures tiny random Pythia and Llama checkpoints (and
    fails: random weights have no induction head) and skips Gemma2 with the engine's reason."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    specs = [save_arch_checkpoint(tmp_path / a, a) for a in ("neox", "llama", "gemma2")]
    cmd = [sys.executable, "-m", "pytest", str(root / "claims" / "test_induction.py"), "-q",
           "-rs", "-p", "no:cacheprovider", "-k", "some_head_does_induction"]
    for s in specs:
        cmd += ["--model", str(s)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600).stdout
    assert "2 failed, 1 skipped" in out, out[-3000:]
    assert out.count("best induction score") >= 2
    assert "unsupported architecture: Engine has no exact implementation for Gemma2" in out
