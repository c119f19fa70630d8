"""Rotary families against TransformerLens: a Pythia-160m-shaped GPT-NeoX (partial rotary,
parallel attention and MLP) and a Llama-shaped model (RMSNorm, gated MLP, grouped-query
attention, 12 layers at d_model 768), random weights, ``resid_pre`` by (layer, pos). The two
implementations (and nnsight 0.8) must agree; ``--benchmark-only`` times them in the same run,
with the same number of rounds, and records each row's arithmetic floor (``floor.py``).
"""

from __future__ import annotations

import pytest
from cases import assert_agree, cells, nnsight_model, prompts, run_nnsight, run_ours, run_tl

from conftest import ROUNDS, record_floor

pytestmark = pytest.mark.heavy  # TransformerLens reference runs at GPT-2 scale

SHAPES = {
    # EleutherAI/pythia-160m's config: 12 x 12 heads, d_model 768, rotary_pct 0.25, parallel
    "pythia-160m": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, rotary_pct=0.25, use_parallel_residual=True,
        max_position_embeddings=2048)),
    # a Llama of GPT-2 small's size: 12 query heads sharing 4 key-value heads
    "llama-160m": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)),
}
IMPLS = ("transformer_lens", "nnsight", "mechtests")
_built: dict = {}
_results: dict = {}


def _model(tmp_path_factory, shape: str):
    if shape not in _built:
        import torch
        import transformers as tf

        from mechtests.core.engine import Engine
        from mechtests.core.models import load_model
        from mechtests.testing import WORDS, word_tokenizer

        cfg_cls, model_cls, kw = SHAPES[shape]
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(shape) / "model"
        getattr(tf, model_cls)(getattr(tf, cfg_cls)(bos_token_id=0, eos_token_id=0, **kw)) \
            .save_pretrained(path)
        word_tokenizer(WORDS).save_pretrained(path)
        model = load_model(str(path), device="cpu")
        _built[shape] = model, Engine(model)
    return _built[shape]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bench_rotary(benchmark, tmp_path_factory, shape, impl):
    model, engine = _model(tmp_path_factory, shape)
    clean, corrupted = prompts(11, 1, vocab=engine.d_vocab)
    sub = cells("resid_pre", "T11xN1", not benchmark.disabled)
    benchmark.group = f"resid_pre T11xN1 {shape}"
    run = {"mechtests": lambda: run_ours(engine, "resid_pre", clean, corrupted, sub),
           "transformer_lens": lambda: run_tl(model, "resid_pre", clean, corrupted, sub),
           "nnsight": lambda: run_nnsight(_nnsight(shape, model), "resid_pre", clean,
                                          corrupted, sub)}
    result = benchmark.pedantic(run[impl], rounds=ROUNDS, iterations=1, warmup_rounds=0)
    record_floor(benchmark, engine, "resid_pre", "T11xN1", sub)
    _results[shape, impl] = result
    if (shape, "mechtests") not in _results:
        _results[shape, "mechtests"] = run["mechtests"]()
    if impl != "mechtests":
        assert_agree("resid_pre", _results[shape, "mechtests"], result)


def _nnsight(shape: str, model):
    if (shape, "nnsight") not in _built:
        _built[shape, "nnsight"] = nnsight_model(model)
    return _built[shape, "nnsight"]
