"""Loading: specs, safety checks, offline behaviour, and the errors a user sees."""

from __future__ import annotations

import shutil

import pytest
import torch

from mechtests.models import CheckpointError, ModelUnavailable, load_model, resolve


def test_loads_local_dir_in_compat_mode(tiny_model):
    m = tiny_model
    assert m.cfg.n_layers == 2 and m.cfg.n_heads == 4
    assert not m.training
    tokens = m.to_tokens("When Mary and John went to the store")
    logits, cache = m.run_with_cache(tokens)
    assert logits.shape == (1, tokens.shape[1], m.cfg.d_vocab)
    # compat mode folds LayerNorm: the block's LN has no weight left, resid is centred
    resid = cache["blocks.1.hook_resid_pre"]
    assert resid.mean(-1).abs().max() < 1e-5


def test_compat_mode_keeps_logits(tiny_model_dir):
    raw = load_model(str(tiny_model_dir), device="cpu", compat=False)
    folded = load_model(str(tiny_model_dir), device="cpu")
    tokens = raw.to_tokens("Mary gave a drink to John")
    a, b = raw(tokens), folded(tokens)
    # centring the unembedding shifts every logit equally: compare log-probabilities
    assert torch.allclose(a.log_softmax(-1), b.log_softmax(-1), atol=1e-4)


def test_missing_hub_model_names_model_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match=r"'gpt2'.*huggingface-cli download gpt2"):
        load_model("gpt2")


def test_pickle_only_dir_refused_with_conversion_hint(tiny_model_dir, tmp_path):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickled weights.*pytorch_model\.bin.*"
                                              r"safe_serialization=True"):
        load_model(str(d))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_incomplete_dir_names_missing_file(tiny_model_dir, tmp_path, missing):
    d = tmp_path / "incomplete"
    shutil.copytree(tiny_model_dir, d)
    (d / missing).unlink()
    with pytest.raises(CheckpointError, match=rf"missing {missing.replace('.', '[.]')}"):
        load_model(str(d))


def test_corrupt_weights_named(tiny_model_dir, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        load_model(str(d))


def test_remote_code_refused(tiny_model_dir, tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, d)
    cfg = (d / "config.json").read_text().replace("{", '{"auto_map": {"AutoModel": "x.Y"},', 1)
    (d / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match=r"custom model code \(auto_map\)"):
        load_model(str(d))


def test_missing_path_is_clear():
    with pytest.raises(CheckpointError, match=r"no such directory"):
        resolve("./no/such/checkpoint")


def test_unknown_dtype(tiny_model_dir):
    with pytest.raises(ValueError, match=r"dtype 'int3'"):
        load_model(str(tiny_model_dir), dtype="int3")
