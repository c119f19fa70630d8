"""Checkpoint sequences (a training run's saved steps) and what identifies each checkpoint.

``--model`` takes one checkpoint or an ordered sequence: a directory whose subdirectories are
checkpoints (``runs/induction/steps/``), or a glob (``'runs/*/checkpoint-*'``). A sequence is
ordered by training step: ``step`` in each checkpoint's ``training.json`` (what
``mechtests.organisms.train --save-every`` writes), else the last number in its directory name
(``checkpoint-500``, ``step_1000``). ``weight_hash`` is the sha256 of a checkpoint's weight files,
recorded in every report so a reader knows which weights were checked.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechtests.core.models import CheckpointError, weight_files

GLOB_CHARS = "*?["
SHAPE_KEYS = (("model_type",), ("n_layer", "num_hidden_layers"),
              ("n_head", "num_attention_heads"), ("n_embd", "hidden_size"), ("vocab_size",))


class SequenceError(CheckpointError):
    """A ``--model`` sequence that cannot be run: empty, unordered, or of mixed shapes."""


def is_glob(spec: str) -> bool:
    return any(c in spec for c in GLOB_CHARS)


CHECKPOINT_FILES = ("config.json", "*.safetensors", "*.bin", "tokenizer.json", "vocab.json",
                    "model.safetensors.index.json")


def is_sequence(spec: str) -> bool:
    """A glob, or an existing directory that is not itself a checkpoint (holds none of a
    checkpoint's files: a broken checkpoint is reported as one, naming what it lacks)."""
    path = Path(spec).expanduser()
    if is_glob(spec):
        return True
    return path.is_dir() and not any(next(path.glob(p), None) for p in CHECKPOINT_FILES)


def _training(path: Path) -> dict[str, Any]:
    f = path / "training.json"
    if not f.is_file():
        return {}
    try:
        got = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SequenceError(f"checkpoint {path}: training.json is not valid JSON ({exc}); fix "
                            f"or remove it") from None
    return got if isinstance(got, dict) else {}


def step_of(path: Path) -> int | None:
    """The checkpoint's training step: training.json ``step``, else its name's last number."""
    step = _training(path).get("step")
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    numbers = re.findall(r"\d+", path.name)
    return int(numbers[-1]) if numbers else None


def _shape(path: Path) -> tuple:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SequenceError(f"checkpoint {path}: config.json is unreadable ({exc})") from None
    return tuple(next((cfg[k] for k in keys if k in cfg), None) for keys in SHAPE_KEYS)


def _shape_text(shape: tuple) -> str:
    kind, layers, heads, width, vocab = shape
    return f"{kind}, {layers} layers x {heads} heads, d_model {width}, vocab {vocab}"


def expand(spec: str) -> list[str]:
    """The checkpoints ``spec`` names, as specs ordered by training step.

    A spec that is not a sequence comes back alone. Raises ``SequenceError`` for a glob that
    matches no checkpoint, a directory holding none, a checkpoint whose step cannot be told,
    two checkpoints at the same step, or checkpoints of different shapes.
    """
    if not is_sequence(spec):
        return [spec]
    if is_glob(spec):
        matched = sorted(glob.glob(str(Path(spec).expanduser())))
        dirs = [Path(p) for p in matched if (Path(p) / "config.json").is_file()]
        if not dirs:
            what = (f"matched {len(matched)} paths, none a checkpoint directory (with "
                    f"config.json): {', '.join(matched[:3])}{' ...' if len(matched) > 3 else ''}"
                    if matched else "matched nothing")
            raise SequenceError(f"--model {spec!r}: the glob {what}. Pass a glob of checkpoint "
                                f"directories, e.g. 'runs/steps/step-*' (quoted, so the shell "
                                f"leaves it to mechtests)")
    else:
        root = Path(spec).expanduser()
        dirs = sorted(p for p in root.iterdir() if (p / "config.json").is_file())
        if not dirs:
            raise SequenceError(
                f"--model {spec!r}: this directory is neither a checkpoint (no config.json) nor "
                f"a sequence of them (no subdirectory holds a config.json). Pass a checkpoint "
                f"directory, a directory of checkpoints (such as the steps/ that "
                f"`python -m mechtests.organisms.train ... --save-every N` writes) or a glob")
        dirs = [Path(spec) / p.name for p in dirs]  # as the user spelled the parent
    steps = {p: step_of(p) for p in dirs}
    unknown = [str(p) for p, s in steps.items() if s is None]
    if unknown:
        raise SequenceError(
            f"--model {spec!r}: cannot order the sequence: {', '.join(unknown[:3])} has no "
            f"training step (no 'step' in its training.json and no number in its name). Name "
            f"the directories by step (step-000500) or record the step in training.json")
    by_step: dict[int, Path] = {}
    for p, s in steps.items():
        if s in by_step:
            raise SequenceError(f"--model {spec!r}: {by_step[s]} and {p} are both step {s}; a "
                                f"sequence has one checkpoint per step")
        by_step[s] = p
    ordered = [by_step[s] for s in sorted(by_step)]
    first = _shape(ordered[0])
    for p in ordered[1:]:
        if _shape(p) != first:
            raise SequenceError(
                f"--model {spec!r}: {p} is a {_shape_text(_shape(p))} model but {ordered[0]} is "
                f"a {_shape_text(first)}; a sequence is one training run. Pass the other "
                f"checkpoint with its own --model")
    return [str(p) for p in ordered]


def expand_all(specs: list[str]) -> list[str]:
    """Every ``--model`` spec expanded, in the order given (each sequence by step)."""
    return [s for spec in specs for s in expand(spec)]


def weight_hash(path: Path) -> dict[str, Any]:
    """``{"sha256": ..., "files": {name: sha256}}`` of a checkpoint's weight files (one
    model.safetensors, or every shard of its index; the combined hash of shards is the sha256 of
    their ``name sha256`` lines)."""
    files = {}
    for f in weight_files(Path(path)):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        files[f.name] = h.hexdigest()
    if len(files) == 1:
        combined = next(iter(files.values()))
    else:
        lines = "".join(f"{n} {d}\n" for n, d in sorted(files.items()))
        combined = hashlib.sha256(lines.encode()).hexdigest()
    return {"sha256": combined, "files": files}


def checkpoint_info(path: Path, in_sequence: bool = False) -> dict[str, Any]:
    """What a report records of a checkpoint: its step and loss (when it has them) and hash.
    A step read from the directory's name counts only for a member of a sequence."""
    info: dict[str, Any] = {"path": str(path)}
    training = _training(path)
    step = step_of(path) if in_sequence or training.get("step") is not None else None
    if step is not None:
        info["step"] = step
    for key in ("loss", "loss_ema", "loss_kind"):
        if training.get(key) is not None:
            info[key] = training[key]
    info.update(weight_hash(path))
    return info


def identical_weights(checkpoints: dict[str, dict[str, Any]]) -> list[str]:
    """One warning per group of checkpoints with the same weight hash."""
    groups: dict[str, list[str]] = {}
    for model, info in checkpoints.items():
        if info.get("sha256"):
            groups.setdefault(info["sha256"], []).append(model)
    return [f"identical weights: {', '.join(ms)} have the same weight files (sha256 "
            f"{digest[:12]}...); one training step may be serving another's weights, as "
            f"published step branches have (EleutherAI/pythia issues 205, 206)"
            for digest, ms in groups.items() if len(ms) > 1]


def unique_specs(specs: Sequence[str]) -> list[str]:
    """The specs once each, in order: the same model given twice runs (and is reported) once.

    A sequence (a directory of checkpoints, or a glob) becomes its checkpoints, ordered by
    training step. Two spellings of one existing directory (``ckpt``, ``./ckpt/``) count as
    the same model. A bad sequence raises ``SequenceError``.
    """
    seen: dict[str, str] = {}
    for spec in expand_all(list(specs)):
        path = Path(spec).expanduser()
        key = str(path.resolve()) if path.is_dir() else spec
        seen.setdefault(key, spec)
    return list(seen.values())
