"""Loading: specs, safety checks, offline behaviour, and the errors a user sees."""

from __future__ import annotations

import shutil

import pytest
import torch

from mechtests.core.models import CheckpointError, ModelUnavailable, load_model, resolve


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
    with pytest.raises(ModelUnavailable, match=r"'gpt2'.*hf download gpt2"):
        load_model("gpt2")


def test_pickle_only_dir_refused_with_conversion_hint(tiny_model_dir, tmp_path):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"the weights are pickled \(pytorch_model\.bin\).*"
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


# -- checkpoints that must be refused, each naming the problem (issue 10) ------------------------
def _copy_with_tensors(src, dst, edit):
    """A copy of checkpoint ``src`` whose model.safetensors went through ``edit(state_dict)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_and_misnamed_tensors_refused_naming_them(tiny_model_dir, tmp_path):
    def edit(sd):
        sd["transformer.h.0.attn.c_attn.weigth"] = sd.pop("transformer.h.0.attn.c_attn.weight")
        del sd["transformer.h.1.mlp.c_fc.bias"]

    d = _copy_with_tensors(tiny_model_dir, tmp_path / "misnamed", edit)
    with pytest.raises(CheckpointError) as exc:
        load_model(str(d), device="cpu")
    msg = str(exc.value)
    assert "would run with random weights" in msg
    assert "2 weight(s) the architecture needs are not in the file: " \
           "transformer.h.0.attn.c_attn.weight, transformer.h.1.mlp.c_fc.bias" in msg
    assert "1 tensor(s) in the file are not weights of this architecture: " \
           "transformer.h.0.attn.c_attn.weigth" in msg


def test_wrong_shape_names_tensor_and_both_shapes(tiny_model_dir, tmp_path):
    def edit(sd):
        sd["transformer.h.0.ln_1.weight"] = torch.ones(7)

    d = _copy_with_tensors(tiny_model_dir, tmp_path / "shape", edit)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) have the wrong shape for "
                                              r"config\.json: transformer\.h\.0\.ln_1\.weight: "
                                              r"file \(7,\), model \(32,\)"):
        load_model(str(d), device="cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused_naming_the_tensor(tiny_model_dir, tmp_path, bad):
    def edit(sd):
        sd["transformer.h.1.attn.c_proj.weight"][3, 5] = bad

    d = _copy_with_tensors(tiny_model_dir, tmp_path / "nan", edit)
    n_nan, n_inf = (1, 0) if bad != bad else (0, 1)
    with pytest.raises(CheckpointError, match=rf"weight transformer\.h\.1\.attn\.c_proj\.weight "
                                              rf"has {n_nan} NaN and {n_inf} infinite values"):
        load_model(str(d), device="cpu")


def test_pickle_is_never_loaded_even_beside_a_stray_safetensors(tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called: a pickle was about to be unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    d = tmp_path / "stray"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    (d / "adapter.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"the weights are pickled \(pytorch_model\.bin\) \("
                                              r"adapter\.safetensors is not the model.s weights"):
        load_model(str(d), device="cpu")
    # model.safetensors beside a pickle: the safetensors file loads, the pickle is never opened
    shutil.copy(tiny_model_dir / "model.safetensors", d / "model.safetensors")
    assert load_model(str(d), device="cpu").cfg.n_layers == 2


def test_sharded_checkpoint_loads_only_when_every_shard_is_there(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(d, max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file()
    whole = load_model(str(tiny_model_dir), device="cpu")
    tokens = whole.to_tokens("Mary gave a drink to John")
    assert torch.allclose(load_model(str(d), device="cpu")(tokens), whole(tokens))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"shards but 1 are missing: {shards[-1].name}"):
        load_model(str(d), device="cpu")


def test_corrupt_tokenizer_json_names_the_file(tiny_model_dir, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, d)
    text = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is corrupt"):
        load_model(str(d), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_says_so_not_the_checkpoint(tiny_model_dir):
    from mechtests.core.models import DeviceError

    with pytest.raises(DeviceError, match=r"--device cuda: no CUDA GPU is available on this "
                                          r"machine.*--device cpu") as exc:
        load_model(str(tiny_model_dir), device="cuda")
    assert "checkpoint" not in str(exc.value)


def test_typos_are_named_with_a_suggestion(monkeypatch, tmp_path):
    from mechtests.core.models import NoSuchModel

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match=r"Did you mean 'induction'\?"):
        resolve("inductoin")
    (tmp_path / "ckpts" / "finetune").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NoSuchModel, match=r"no such directory.*Did you mean 'ckpts/finetune'\?"):
        resolve("./ckpts/fintune")
