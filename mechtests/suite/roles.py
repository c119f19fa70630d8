"""Components by role: a claim names its heads by what they do, as well as by index.

A role is a query over the suite's own measurements ("name movers: the heads beyond layer 0 with
the largest positive direct logit attribution, each at least half a logit"). ``cast`` resolves it
on a subject; ``verdict`` asserts the claim on whoever plays it:

* on a reference subject (GPT-2, an organism) the role must resolve to the published or found
  heads: that is the claim about that model, asserted;
* on any other checkpoint the claim is checked on whatever plays the role: **held** (the same
  heads), **held, moved** (``3.3 -> 3.0``, the report's ``moved`` outcome), or **failed: no
  component plays the role**;
* ``--strict-components`` asks the old question instead, "are the very same heads still doing
  it": the role must resolve to the reference's indices on every checkpoint, and the claim is
  checked on those. Whichever question decides, when the two differ the other one's answer is
  recorded beside the verdict (``record.beside``) and shown in the report.

On a checkpoint with no reference of its shape (a real model of another size or family) there
are no reference components to compare with: the role is cast from the subject's own
measurements (``cast`` with ``expected=()`` and ``n``), on one seeded half of the prompt family,
and the mechanism is confirmed on the other half (``claims.families.split_on``). Such a verdict
is **held** (on the components cast here, named in the report), **failed: no component plays
the role**, or failed by the check. It has a control: the same check on as many other
components, drawn at random (seeded), must fail; a check that holds for them too does not single
out the components it names, and the claim fails saying so.

Components are head labels (``"9.9"``) read through ``mechtests.core.sites``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mechtests.core.sites import Head
from mechtests.suite.claims import Inconclusive, holds_set

CONTROL_SEED = 0  # which other components the control draws


class RoleVacant(AssertionError):
    """No component (or too few) plays the role on this subject: the claim failed."""


@dataclass(frozen=True)
class Role:
    """A role: its name and the query, in words (``means``), that resolves it."""

    name: str
    means: str


@dataclass(frozen=True)
class Cast:
    """A role resolved on one subject: who was expected (the reference's components, in its
    order) and who plays it here (best first; shorter than ``expected`` when vacant)."""

    role: Role
    expected: tuple[str, ...]
    found: tuple[str, ...]
    reference: bool  # the subject is the reference itself: the role must resolve to expected
    strict: bool  # --strict-components: the claim is checked on the expected components
    scores: Mapping[str, float] = field(default_factory=dict)
    wanted: int = 0  # how many components the role needs: len(expected), or cast's need
    pool: tuple[str, ...] = ()  # every component scored (the control draws from the rest)

    @property
    def anew(self) -> bool:
        """Cast with no reference components to compare with (no reference of this shape)."""
        return not self.expected

    @property
    def vacant(self) -> tuple[str, ...]:
        """Expected components no one plays here (``len(expected) - len(found)`` of them); on
        a cast anew, ``#k`` for each of the ``wanted`` places no component filled."""
        if self.anew:
            return tuple(f"#{k}" for k in range(len(self.found) + 1, self.wanted + 1))
        return tuple(p[0] for p in self.pairs() if p[1] is None)

    def pairs(self) -> list[tuple[str, str | None]]:
        """Each expected component with the one that plays its part here. A role is a set:
        heads in both keep theirs, those that left pair with those that arrived in order (best
        with best); which left head became which arrived one is not in the scores."""
        left = [f for f in self.found if f not in self.expected]
        out = []
        for e in self.expected:
            out.append((e, e if e in self.found else (left.pop(0) if left else None)))
        return out

    @property
    def moved(self) -> dict[str, str]:
        """``{"3.3": "3.0"}``: expected components whose part another component plays here."""
        return {e: f for e, f in self.pairs() if f is not None and f != e}

    @property
    def components(self) -> tuple[str, ...]:
        """What the claim is checked on: the reference's components under strict, else who
        plays the role here."""
        return self.expected if self.strict else self.found


def by_head(result: Any) -> dict[str, float]:
    """``{"1.3": value, ...}`` of a (layer, head) ``Result``: the scores ``cast`` ranks."""
    values = result.values
    return {str(Head(layer, h)): float(values[layer, h])
            for layer in range(values.shape[0]) for h in range(values.shape[1])}


def strict_mode(record: Any) -> bool:
    """Whether this run asks the strict question (``--strict-components``)."""
    config = getattr(getattr(record, "_node", None), "config", None)
    return bool(config is not None and config.getoption("--strict-components", False))


def is_reference(subject: Any, ref_name: str) -> bool:
    """The subject is the reference itself: not a mutant, not another checkpoint of its shape,
    not a copy that merely shares its directory name (a shipped organism is its own files)."""
    from mechtests.core.models import organism_dir, spec_of

    if getattr(subject, "name", None) != ref_name or getattr(subject, "mutant", ""):
        return False
    spec = spec_of(getattr(subject, "model", None))
    organism = organism_dir(ref_name)
    if spec is not None and organism.is_dir():
        return Path(spec.path).resolve() == organism.resolve()
    return True


def cast(subject: Any, ref_name: str | None, role: Role, expected: Sequence[str],
         scores: Mapping[str, float], record: Any, *, n: int | None = None,
         floor: float | None = None, eligible: Callable[[Head], bool] = lambda h: True,
         largest: bool = True, need: int | None = None) -> Cast:
    """Resolve ``role`` on ``subject``: the ``n`` (default ``len(expected)``) eligible heads
    with the largest (``largest=False``: smallest) ``scores``, each clearing ``floor`` (``>=``,
    or ``<=`` when ``largest=False``). Records the cast for the report. ``expected=()`` and
    ``ref_name=None``: cast anew, on a subject with no reference of its shape; then the role is
    vacant when fewer than ``need`` (default ``n``) heads qualify."""
    expected = tuple(str(Head.parse(e)) for e in expected)
    n = len(expected) if n is None else n
    pool = tuple(sorted(str(Head.parse(h)) for h in scores))
    ranked = sorted((str(Head.parse(h)), float(v)) for h, v in scores.items()
                    if eligible(Head.parse(h)))
    ranked.sort(key=lambda hv: -hv[1] if largest else hv[1])
    if floor is not None:
        ranked = [(h, v) for h, v in ranked if (v >= floor if largest else v <= floor)]
    c = Cast(role, expected, tuple(h for h, _ in ranked[:n]),
             ref_name is not None and is_reference(subject, ref_name), strict_mode(record),
             dict(scores), n if need is None or expected else need, pool)
    if hasattr(record, "cast"):
        record.cast(role.name, role.means, c.expected, c.found, c.moved, c.vacant)
    return c


def _identity(c: Cast, why: str, record: Any) -> None:
    __tracebackhide__ = True
    holds_set(c.found, c.expected, f"{c.role.name} ({c.role.means})", why, record,
              scores={h: round(c.scores[h], 4) for h in c.found})


def _by_role(c: Cast, check: Callable[[tuple[str, ...]], None], record: Any) -> None:
    __tracebackhide__ = True
    if c.reference:
        _identity(c, "on the reference the role resolves to its published (or found) heads",
                  record)
    if c.vacant:
        best = sorted(c.scores.items(), key=lambda hv: -hv[1])[:3]
        raise RoleVacant(
            f"no component plays the role {c.role.name!r} ({c.role.means}) in place of "
            f"{list(c.vacant)}: found {list(c.found) or 'none'}; highest scores "
            + ", ".join(f"{h} {v:.3g}" for h, v in best))
    check(c.found)


def _strict(c: Cast, check: Callable[[tuple[str, ...]], None], record: Any) -> None:
    __tracebackhide__ = True
    _identity(c, "--strict-components: the very same heads must play the role", record)
    check(c.expected)


def verdict(casts: Cast | Sequence[Cast], check: Callable[..., None], record: Any) -> None:
    """Assert the claim: ``check(*components)`` on who plays each role (or, under
    ``--strict-components``, on the reference's own components). When the two questions
    differ here (a role moved or is vacant), the other one is answered too, its measurements
    kept aside, and its outcome recorded beside the verdict (``record.beside``)."""
    __tracebackhide__ = True
    casts = [casts] if isinstance(casts, Cast) else list(casts)
    if all(c.anew for c in casts):
        return _anew(casts, check, record)
    strict = any(c.strict for c in casts)

    def run(question: str) -> None:
        __tracebackhide__ = True
        for c in casts:
            (_strict if question == "strict" else _by_role)(c, lambda *_: None, record)
        check(*[c.expected if question == "strict" else c.found for c in casts])

    primary, other = ("strict", "role") if strict else ("role", "strict")
    if any(c.moved or c.vacant for c in casts):
        outcome, reason = "held", ""
        with record.aside():
            try:
                run(other)
            except RoleVacant as exc:
                outcome, reason = "failed", str(exc).splitlines()[0]
            except AssertionError as exc:
                outcome, reason = "failed", str(exc).splitlines()[0]
            except Inconclusive as exc:
                outcome, reason = "inconclusive", str(exc).splitlines()[0]
        record.beside(other, outcome, reason)
    run(primary)


def others(c: Cast, seed: int = CONTROL_SEED) -> tuple[str, ...]:
    """As many components as ``c`` found, none of them found, drawn at random (seeded) from
    every component scored, not only the eligible ones (eligibility may be the very property
    the check confirms): the control a cast-anew claim is checked on too."""
    rest = [h for h in c.pool if h not in c.found]
    if len(rest) < len(c.found):
        return ()
    return tuple(random.Random(seed).sample(rest, len(c.found)))


def _anew(casts: list[Cast], check: Callable[..., None], record: Any) -> None:
    """The verdict on a subject with no reference of its shape: the check on who plays each
    role here, then the control (the check on as many other components, ``others``) must fail."""
    __tracebackhide__ = True
    if any(c.strict for c in casts):
        pytest.skip("--strict-components asks whether the reference's own heads play the role; "
                    "this checkpoint has no reference of its shape, so there are none to ask "
                    "about (leave --strict-components out to cast the roles on it)")
    for c in casts:
        _by_role(c, lambda *_: None, record)
    check(*[c.found for c in casts])
    drawn = [others(c) for c in casts]
    if not all(drawn):
        record.beside("control", "not run", "too few other components to draw from")
        return
    what = "; ".join(f"{c.role.name}: {list(o)}" for c, o in zip(casts, drawn))
    control(lambda: check(*drawn), what, "the components cast here", record)


def control(check: Callable[[], None], what: str, found: str, record: Any) -> None:
    """The control of a claim cast anew on a model with no reference of its shape: the same
    ``check`` on ``what`` (stand-ins drawn at random with ``CONTROL_SEED``: heads for
    ``verdict``; neurons, modules, positions or a direction for the claims that name those)
    must fail. One that holds there too does not single out ``found``, and the claim fails
    saying so. Recorded beside the verdict either way."""
    __tracebackhide__ = True
    outcome, reason = "held", ""
    with record.aside():
        try:
            check()
        except AssertionError as exc:
            outcome, reason = "failed", str(exc).splitlines()[0]
        except Inconclusive as exc:
            outcome, reason = "inconclusive", str(exc).splitlines()[0]
    record.beside("control", outcome, f"the same check on {what}" + (
        f": {reason}" if reason else ""))
    if outcome == "held":
        raise AssertionError(
            f"the check does not single out {found}: it holds as well on {what}, drawn at "
            f"random (seed {CONTROL_SEED}), so it says nothing about who plays the role")
