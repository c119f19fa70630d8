"""Get a model under test from a spec: a hub name, a local Hugging Face directory, or an organism.

Everything loads through TransformerLens 4.x (``TransformerBridge.boot_transformers``) from a
local directory that has been checked first: safetensors only, never pickles, never remote code,
and never a download (hub names resolve from the local Hugging Face cache or not at all).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ORGANISMS = ROOT / "fixtures" / "organisms"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class ModelUnavailable(RuntimeError):
    """The model's weights are not on this machine (and nothing is ever downloaded)."""

    def __init__(self, spec: str, message: str):
        super().__init__(message)
        self.spec = spec


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, corrupt or unsafe to load."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved spec: what the user wrote, where the files are, and a short display name."""

    spec: str
    path: Path
    name: str


def resolve(spec: str) -> ModelSpec:
    """Turn ``gpt2`` / ``path/to/dir`` / ``induction`` (a shipped organism) into a local dir."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSpec(spec, path.resolve(), path.name)
    if (ORGANISMS / spec).is_dir():
        return ModelSpec(spec, ORGANISMS / spec, spec)
    if path.is_absolute() or spec.startswith((".", "~")) or os.sep in spec and spec.count("/") > 1:
        raise CheckpointError(
            f"model {spec!r}: no such directory. Pass a directory holding config.json, "
            f"model.safetensors and tokenizer files, a hub name such as 'gpt2', or one of the "
            f"shipped organisms: {', '.join(organisms()) or '(none)'}"
        )
    return ModelSpec(spec, _from_hub_cache(spec), spec)


def organisms() -> list[str]:
    """Names of the model organisms shipped in ``fixtures/organisms``."""
    if not ORGANISMS.is_dir():
        return []
    return sorted(p.name for p in ORGANISMS.iterdir() if (p / "config.json").is_file())


def _from_hub_cache(name: str) -> Path:
    """The local snapshot directory of a hub model, or ``ModelUnavailable`` (never downloads)."""
    how = (
        f"Make it available with `hf download {name}` (huggingface_hub's CLI) on a machine "
        f"with internet access (it fills the Hugging Face cache, ~/.cache/huggingface), or "
        f"pass a local directory holding its config.json, model.safetensors and tokenizer files: "
        f"--model /path/to/{name.split('/')[-1]}"
    )
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(name, local_files_only=True,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as exc:  # noqa: BLE001 - any miss means: not on this machine
        raise ModelUnavailable(
            name, f"model {name!r}: weights are not on this machine (not a local directory, not "
            f"a shipped organism, not in the Hugging Face cache; nothing is downloaded). {how}"
        ) from exc
    path = Path(snap)
    if not any(path.glob("*.safetensors")):
        raise ModelUnavailable(
            name, f"model {name!r}: the Hugging Face cache at {path} holds no model.safetensors "
            f"(only part of the checkpoint was downloaded). {how}"
        )
    return path


def check_checkpoint(path: Path) -> None:
    """Refuse a directory that is incomplete, corrupt, pickled or asks for remote code."""
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"checkpoint {path}: missing config.json. A Hugging Face checkpoint directory needs "
            f"config.json, model.safetensors and tokenizer files (tokenizer.json, or vocab.json "
            f"+ merges.txt); save one with model.save_pretrained(dir) and "
            f"tokenizer.save_pretrained(dir)."
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON ({exc})") from exc
    if "auto_map" in config:
        raise CheckpointError(
            f"checkpoint {path}: config.json asks for custom model code (auto_map). mechtests "
            f"never runs code shipped with a checkpoint; use an architecture that transformers "
            f"supports natively."
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise CheckpointError(
                f"checkpoint {path}: only pickled weights ({', '.join(pickles)}); mechtests "
                f"loads safetensors only, because unpickling an untrusted file can run arbitrary "
                f"code. Convert it once where you trust the file: "
                f"`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                f"safe_serialization=True)`, which writes model.safetensors."
            )
        raise CheckpointError(
            f"checkpoint {path}: missing model.safetensors (the weights). Save the model with "
            f"model.save_pretrained(dir)."
        )
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                keys = list(f.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise CheckpointError(
                f"checkpoint {path}: {w.name} is corrupt or truncated ({exc}); re-save or "
                f"re-download it."
            ) from exc
        if not keys:
            raise CheckpointError(f"checkpoint {path}: {w.name} holds no tensors")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"checkpoint {path}: missing tokenizer.json (or vocab.json + merges.txt). Save the "
            f"tokenizer beside the weights with tokenizer.save_pretrained(dir)."
        )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: str, device: str | None = None, dtype: str | torch.dtype = "float32",
               compat: bool = True):
    """Load ``spec`` as a ``TransformerBridge`` in eval mode.

    ``compat=True`` (default) calls ``enable_compatibility_mode()`` so per-head attributions
    are comparable with published HookedTransformer numbers (LayerNorm folded, writing weights
    and unembedding centred).
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load is noise in a claims run
    resolved = resolve(spec)
    check_checkpoint(resolved.path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    device = device or default_device()
    try:
        model = TransformerBridge.boot_transformers(
            str(resolved.path), device=device, dtype=dtype, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - name the checkpoint in whatever went wrong
        raise CheckpointError(f"checkpoint {resolved.path}: could not be loaded: {exc}") from exc
    if compat:
        model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    model.mechtests_spec = resolved  # type: ignore[attr-defined]
    return model


def describe(model) -> str:
    """``'4 layers x 4 heads, d_model 64'``: the shape a head-index claim depends on."""
    c = model.cfg
    return f"{c.n_layers} layers x {c.n_heads} heads, d_model {c.d_model}"
