"""Get a model under test from a spec: a hub name, a local Hugging Face directory, an organism,
or a real pretrained model known by name (``smollm2``: ``mechtests.core.real_models``).

Everything loads through TransformerLens 4.x (``TransformerBridge.boot_transformers``) from a
local directory that has been checked first: safetensors only, never pickles, never remote code,
and never a download (hub names resolve from the local Hugging Face cache or not at all).
"""

from __future__ import annotations

import difflib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from mechtests.core.errors import CheckpointError, ModelUnavailable
from mechtests.core.real_models import REAL_MODELS, real_model_dir

ORGANISMS_ENV = "MECHTESTS_ORGANISMS"  # a directory of organism checkpoints, if set


def organisms_dir() -> Path:
    """Where the shipped organism checkpoints are: ``$MECHTESTS_ORGANISMS`` if set, else the
    source tree's ``fixtures/organisms`` (a checkout or an editable install), else
    ``./fixtures/organisms``. The one place that knows."""
    env = os.environ.get(ORGANISMS_ENV)
    if env:
        return Path(env).expanduser()
    tree = Path(__file__).resolve().parents[2] / "fixtures" / "organisms"
    return tree if tree.is_dir() else Path.cwd() / "fixtures" / "organisms"


def organism_dir(name: str) -> Path:
    """The checkpoint directory of the shipped organism ``name``."""
    return organisms_dir() / name


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class NoSuchModel(CheckpointError):
    """A spec that looks like a path names no directory (a typo, or the wrong working dir)."""


class DeviceError(ValueError):
    """The requested device does not exist on this machine (not the checkpoint's fault)."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved spec: what the user wrote, where the files are, and a short display name."""

    spec: str
    path: Path
    name: str


def looks_like_path(spec: str) -> bool:
    """``./x``, ``~/x``, ``/x``, ``a/b/c``, ``x/``, ``a\\b``: never a hub name (``org/name``)."""
    return (Path(spec).expanduser().is_absolute() or spec.startswith((".", "~"))
            or spec.count("/") > 1 or spec.endswith("/") or "\\" in spec)


def _did_you_mean(spec: str) -> str:
    """`` Did you mean 'induction'?`` for a near miss of an organism, a real model's name or a
    sibling directory."""
    path = Path(spec).expanduser()
    candidates = {o: o for o in (*organisms(), *REAL_MODELS)}
    parent = path.parent if str(path.parent) not in ("", ".") or "/" in spec else Path(".")
    if parent.is_dir():
        try:
            for p in parent.iterdir():
                if p.is_dir() and not p.name.startswith("."):
                    shown = str(p) if "/" in spec or spec.startswith(".") else p.name
                    candidates.setdefault(p.name, shown)
        except OSError:
            pass
    close = difflib.get_close_matches(path.name, list(candidates), n=3, cutoff=0.75)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(candidates[c]) for c in close) + "?"


def resolve(spec: str) -> ModelSpec:
    """Turn ``gpt2`` / ``path/to/dir`` / ``induction`` (a shipped organism) / ``smollm2`` (a
    real model, converted once into the cache) into a local dir."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSpec(spec, path.resolve(), path.name)
    if spec and (organisms_dir() / spec).is_dir():
        return ModelSpec(spec, organism_dir(spec), spec)
    if spec in REAL_MODELS:
        return ModelSpec(spec, real_model_dir(spec), spec)
    if looks_like_path(spec):
        raise NoSuchModel(
            f"model {spec!r}: no such directory ({path.absolute()}).{_did_you_mean(spec)} Pass "
            f"a directory holding config.json, model.safetensors and tokenizer files, a hub "
            f"name such as 'gpt2', one of the shipped organisms: "
            f"{', '.join(organisms()) or '(none)'}, or a real model: {', '.join(REAL_MODELS)}"
        )
    return ModelSpec(spec, _from_hub_cache(spec), spec)


def organisms() -> list[str]:
    """Names of the model organisms shipped in ``organisms_dir()``."""
    root = organisms_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def checkpoint_shape(spec: str) -> tuple[int, int, int, int]:
    """``(n_layers, n_heads, d_model, d_vocab)`` of a local checkpoint (a directory or a shipped
    organism), from its config.json, without loading it."""
    cfg = json.loads((resolve(spec).path / "config.json").read_text())
    return (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"])


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
        where = f" (a directory {Path(name).absolute()} does not exist either)" if "/" in name \
            else ""
        raise ModelUnavailable(
            name, f"model {name!r}: weights are not on this machine (not a local directory, not "
            f"a shipped organism, not a real model ({', '.join(REAL_MODELS)}), not in the Hugging "
            f"Face cache{where}; nothing is "
            f"downloaded).{_did_you_mean(name)} {how}"
        ) from exc
    path = Path(snap)
    if not (path / WEIGHTS).is_file() and not (path / WEIGHTS_INDEX).is_file():
        raise ModelUnavailable(
            name, f"model {name!r}: the Hugging Face cache at {path} holds no {WEIGHTS} "
            f"(only part of the checkpoint was downloaded). {how}"
        )
    return path


def weight_files(path: Path) -> list[Path]:
    """The safetensors files a checkpoint loads from: ``model.safetensors``, or every shard of
    a complete ``model.safetensors.index.json``; anything else is refused."""
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((path / WEIGHTS_INDEX).read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"checkpoint {path}: {WEIGHTS_INDEX} is not a valid shard index ({exc!r}); "
                f"it needs a \"weight_map\" from tensor names to shard files. Re-save the "
                f"model with model.save_pretrained(dir)."
            ) from exc
        bad = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors")]
        if bad:
            raise CheckpointError(
                f"checkpoint {path}: {WEIGHTS_INDEX} names shards that are not .safetensors "
                f"files in the checkpoint directory: {', '.join(map(repr, bad[:5]))}. mechtests "
                f"loads safetensors only."
            )
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {path}: {WEIGHTS_INDEX} lists {len(shards)} shards but "
                f"{len(missing)} are missing: {', '.join(missing[:5])}. Copy or download the "
                f"whole checkpoint."
            )
        return [path / s for s in shards]
    pickles = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth"),
                                      *path.glob("*.ckpt")))
    others = sorted(p.name for p in path.glob("*.safetensors"))
    stray = (f" ({', '.join(others[:5])} is not the model's weights: they must be "
             f"model.safetensors or the shards of a {WEIGHTS_INDEX})") if others else ""
    if pickles:
        raise CheckpointError(
            f"checkpoint {path}: missing model.safetensors; the weights are pickled "
            f"({', '.join(pickles)}){stray}. mechtests loads safetensors only, because "
            f"unpickling an untrusted file can run arbitrary code. Convert it once where you "
            f"trust the file: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            f"safe_serialization=True)`, which writes model.safetensors."
        )
    raise CheckpointError(
        f"checkpoint {path}: missing model.safetensors (the weights){stray}. Save the model "
        f"with model.save_pretrained(dir)."
    )


def check_checkpoint(path: Path) -> None:
    """Refuse a directory that is incomplete, corrupt, pickled or asks for remote code.

    Reads file headers only (cheap): the weights' values are checked when they load.
    """
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"checkpoint {path}: missing config.json. A Hugging Face checkpoint directory needs "
            f"config.json, model.safetensors and tokenizer files (tokenizer.json, or vocab.json "
            f"+ merges.txt); save one with model.save_pretrained(dir) and "
            f"tokenizer.save_pretrained(dir)."
        )
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: config.json is not a JSON object")
    if "auto_map" in config:
        raise CheckpointError(
            f"checkpoint {path}: config.json asks for custom model code (auto_map). mechtests "
            f"never runs code shipped with a checkpoint; use an architecture that transformers "
            f"supports natively."
        )
    from safetensors import safe_open

    for w in weight_files(path):
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
    for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            text = f.read_text(encoding="utf-8")
            json.loads(text)
            if name == "tokenizer.json":
                from tokenizers import Tokenizer

                Tokenizer.from_str(text)
        except Exception as exc:  # noqa: BLE001 - JSON, unicode and tokenizers errors alike
            raise CheckpointError(
                f"checkpoint {path}: {name} is corrupt ({type(exc).__name__}: {exc}); re-save "
                f"the tokenizer with tokenizer.save_pretrained(dir) or copy the file again."
            ) from exc


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """The device to load on, or ``DeviceError`` saying what this machine has instead."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda or "
                          f"cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else
                                                    ", a build without CUDA")
            raise DeviceError(
                f"--device {device}: no CUDA GPU is available on this machine ({build}). "
                f"Use --device cpu, or leave --device out (cuda when available, else cpu)."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s), numbered from 0")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {device}: MPS is not available on this machine; use "
                          f"--device cpu")
    return str(dev)


# Buffers some older GPT-2 checkpoints carry that are not weights (the causal mask's constant):
# present in the file but not in the model, and safe to drop. Anything else unexpected is refused.
IGNORED_UNEXPECTED = (".attn.masked_bias", ".attn.bias")


def _shown(names, n: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _load_weights(path: Path, dtype: torch.dtype):
    """The Hugging Face model, from safetensors only, refusing any tensor that does not fit.

    ``use_safetensors=True`` means transformers never falls back to a pickle; every weight the
    architecture has must come from the file under its own name and shape, and be finite.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False,
                                            output_attentions=True)  # as TL boots it
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True, ignore_mismatched_sizes=True, dtype=dtype,
            attn_implementation="eager", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - name the checkpoint in whatever went wrong
        raise CheckpointError(f"checkpoint {path}: could not be loaded: "
                              f"{type(exc).__name__}: {exc}") from exc
    missing = set(info.get("missing_keys") or ())
    unexpected = {k for k in info.get("unexpected_keys") or () if not k.endswith(
        IGNORED_UNEXPECTED)}
    mismatched = list(info.get("mismatched_keys") or ())
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) the architecture needs are not in the file: "
                        f"{_shown(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the file are not weights of this "
                        f"architecture: {_shown(unexpected)}")
    if mismatched:
        shown = "; ".join(f"{k}: file {tuple(a)}, model {tuple(b)}"
                          for k, a, b in sorted(mismatched, key=lambda m: m[0])[:8])
        more = f" (and {len(mismatched) - 8} more)" if len(mismatched) > 8 else ""
        problems.append(f"{len(mismatched)} tensor(s) have the wrong shape for config.json: "
                        f"{shown}{more}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path}: the weights do not fill the model ({config.model_type}), so it "
            f"would run with random weights where they are missing: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights and that the tensor names are "
            "those model.save_pretrained(dir) writes."
        )
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            n_nan, n_inf = int(t.isnan().sum()), int(t.isinf().sum())
            raise CheckpointError(
                f"checkpoint {path}: weight {name} has {n_nan} NaN and {n_inf} infinite values "
                f"(of {t.numel()}, in {str(dtype).removeprefix('torch.')}); every number mechtests "
                f"measured on it would be meaningless. Use a checkpoint saved before training "
                f"diverged" + (", or load it in float32 (--dtype float32): it overflows here"
                               if dtype in (torch.float16, torch.bfloat16) else "") + "."
            )
    return model


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
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    device = check_device(device)
    resolved = resolve(spec)
    check_checkpoint(resolved.path)
    hf_model = _load_weights(resolved.path, dtype).to(device)
    try:
        model = TransformerBridge.boot_transformers(
            str(resolved.path), hf_model=hf_model, device=device, dtype=dtype,
            trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - name the checkpoint in whatever went wrong
        raise CheckpointError(f"checkpoint {resolved.path}: could not be loaded: "
                              f"{type(exc).__name__}: {exc}") from exc
    if compat:
        model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    remember(model, resolved)
    return model


# What mechtests knows about a model it loaded (or a mutant it built), held beside the model
# rather than on it: entries go when the model does.
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REFERENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember(model, spec: ModelSpec, reference=None) -> None:
    """Record where ``model``'s checkpoint is (``spec``) and, for a model built in memory (a
    mutant), the Hugging Face model its engine checks itself against."""
    _SPECS[model] = spec
    if reference is not None:
        _REFERENCES[model] = reference


def spec_of(model) -> ModelSpec | None:
    """The ``ModelSpec`` ``model`` was loaded from by ``load_model``, or None."""
    try:
        return _SPECS.get(model)
    except TypeError:  # not weak-referenceable: not one of ours
        return None


def reference_of(model):
    """The in-memory Hugging Face reference of a model built by mechtests (a mutant), or None."""
    try:
        return _REFERENCES.get(model)
    except TypeError:
        return None


def describe(model) -> str:
    """``'4 layers x 4 heads, d_model 64'``: the shape a head-index claim depends on."""
    c = model.cfg
    return f"{c.n_layers} layers x {c.n_heads} heads, d_model {c.d_model}"
