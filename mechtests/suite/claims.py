"""What claim files share: which reference a checkpoint is compared with, and assertions that
explain themselves (measured value, threshold and why, components expected and found)."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from mechtests.core.models import checkpoint_shape, describe

T = TypeVar("T")

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}

# (n_layers, n_heads, d_model, d_vocab) of the reference models that claims are written for.
GPT2_SHAPE = (12, 12, 768, 50257)


def shape_of(model: Any) -> tuple[int, int, int, int]:
    c = model.cfg
    return (c.n_layers, c.n_heads, c.d_model, c.d_vocab)


def reference_shape(name: str) -> tuple[int, int, int, int]:
    """The shape of a reference subject: GPT-2 small, or a shipped organism's config."""
    if name in ("gpt2", "openai-community/gpt2"):
        return GPT2_SHAPE
    return checkpoint_shape(name)


def _describe(shape: tuple[int, int, int, int]) -> str:
    return f"{shape[0]}-layer, {shape[1]}-head model (d_model {shape[2]}, vocab {shape[3]})"


def travels(subject: Any, refs: Mapping[str, Any]) -> bool:
    """No reference in ``refs`` applies to ``subject`` (neither by name nor by shape): its roles
    are cast anew from its own measurements (``mechtests.suite.roles``)."""
    if subject.name in refs:
        return False
    shape = shape_of(subject.model)
    return not any(reference_shape(n) == shape for n in refs)


def synthetic(subject: Any, refs: Mapping[str, Any], language: str) -> None:
    """Skip, saying why, a claim about an organism's synthetic language on a model with no
    reference of its shape: a model never trained on that language has nothing to show."""
    if travels(subject, refs):
        pytest.skip(f"a claim about the synthetic language of the {', '.join(refs)} organism "
                    f"({language}): a model never trained on it has nothing to show; it runs "
                    f"on that organism and on checkpoints of its shape (a fine-tune, a seed)")


def reference(subject: Any, refs: Mapping[str, T]) -> tuple[str, T]:
    """The expectations that apply to ``subject``: its own by name, else those of a reference
    of the same shape (a fine-tune or another seed of it). Skips, saying why, otherwise."""
    if subject.name in refs:
        return subject.name, refs[subject.name]
    shape = shape_of(subject.model)
    for name, exp in refs.items():
        if reference_shape(name) == shape:
            return name, exp
    about = "; ".join(f"{n}: {_describe(reference_shape(n))}" for n in refs)
    pytest.skip(f"no reference of this checkpoint's shape: the claim names components of "
                f"{about}; this checkpoint is a {_describe(shape)}")


@dataclass
class Subject:
    """A model under test: the spec the user gave, its display name and the loaded bridge."""

    spec: str
    name: str
    model: Any
    mutant: str = ""  # a --mutate mutant of the subject: never the reference itself

    @property
    def shape(self) -> str:
        return describe(self.model)

    def __repr__(self) -> str:  # failures show this, never the model's module tree
        try:
            return f"Subject({self.spec!r}: {self.shape})"
        except Exception:  # noqa: BLE001 - a repr must not raise
            return f"Subject({self.spec!r})"


class Inconclusive(Exception):
    """The effect a claim measures is too small to judge: neither held nor failed.

    Raised by ``effect_size`` (the guard every claim with a clean/corrupted contrast calls
    before its measurements); the plugin reports it as its own outcome, *inconclusive*."""


MIN_EFFECT = 1.0  # logits (or nats): clean and corrupted must differ by this much


def effect_size(clean: float, corrupted: float, what: str, record: Any = None,
                minimum: float = MIN_EFFECT,
                why: str = "below that, the clean and corrupted runs are too alike for a "
                           "restoration or a knockout fraction to mean anything") -> float:
    """Guard: ``clean - corrupted >= minimum``, else ``Inconclusive`` (never held). Recorded as
    a sanity check, not as evidence. Returns the gap."""
    __tracebackhide__ = True
    gap = float(clean) - float(corrupted)
    if record is not None:
        record.measured(gap, minimum, ">=", f"effect size: {what}", kind="sanity")
    if not gap >= minimum:
        raise Inconclusive(f"effect size {what}: clean {float(clean):.4g} vs corrupted "
                           f"{float(corrupted):.4g}, gap {gap:.4g} < {minimum:.4g} ({why})")
    return gap


def holds(measured: float, op: str, threshold: float, what: str, why: str,
          record: Any = None, kind: str = "evidence", **context: Any) -> None:
    """Assert ``measured op threshold``; the failure message says what was measured, against
    which threshold and why that threshold, plus any context (expected vs found components).
    ``kind="sanity"`` for a check that holds by construction (reported as such)."""
    __tracebackhide__ = True
    ok = OPS[op](measured, threshold)
    if record is not None:
        record.measured(measured, threshold, op, what, kind=kind)
    if not ok:
        extra = "".join(f"\n  {k}: {_fmt(v)}" for k, v in context.items())
        raise AssertionError(
            f"{what}: measured {measured:.4g}, claim needs {op} {threshold:.4g} ({why}){extra}"
        )


def holds_set(found: Sequence[str], expected: Sequence[str], what: str, why: str,
              record: Any = None, **context: Any) -> None:
    """Assert that every expected component is among those found (e.g. the top-k heads)."""
    __tracebackhide__ = True
    missing = [c for c in expected if c not in found]
    if record is not None:
        record.measured(len(expected) - len(missing), len(expected), ">=",
                        f"{what}: expected {list(expected)} among {list(found)}")
    if missing:
        extra = "".join(f"\n  {k}: {_fmt(v)}" for k, v in context.items())
        raise AssertionError(
            f"{what}: expected {list(expected)} among {list(found)}; missing {missing} ({why})"
            f"{extra}"
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)
