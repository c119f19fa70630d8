"""The prompt families each claim is measured on, per reference subject and kind.

GPT-2's come from the published experiments (``mechtests.families``); the organisms' from their
synthetic language (``mechtests.organisms.language``): fresh prompts (seeds far above any
training batch's) over the training word lists, from several templates of one token count (a
family runs as one batch). Held-out names are not used: the multitask organism's IOI and recall
circuits do not carry over to names it never saw in those tasks (FINDINGS.md). The IOI organism
(``mechtests.organisms.ioi``) has a sub-vocabulary of GPT-2's tokenizer and runs GPT-2's IOI
families as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from mechtests import families as gpt2
from mechtests.core.engine import run
from mechtests.core.prompts import PromptError, PromptFamily, TokenizedFamily, fit
from mechtests.organisms import language as lang
from mechtests.organisms.analysis import EVAL_SEED
from mechtests.suite.claims import (
    effect_size,
    reference,
    reference_shape,
    shape_of,
)

N = 8  # prompts per template in a generated organism family


def _organism(name: str, generate: Callable[..., list[dict]], templates: tuple[int, ...],
              n: int = N, **kw) -> PromptFamily:
    items = [d for t in templates
             for d in generate(n, seed=EVAL_SEED + t, template=t, split="train", **kw)]
    return lang.as_family(name, items)


FAMILIES: dict[str, dict[str, dict[str, Callable[[], PromptFamily]]]] = {
    "ioi": {
        "gpt2": {"ABBA": lambda: gpt2.gpt2_ioi("ABBA"), "BABA": lambda: gpt2.gpt2_ioi("BABA")},
        # the IOI organism speaks GPT-2's tokens: GPT-2's own families, unchanged
        "ioi": {"ABBA": lambda: gpt2.gpt2_ioi("ABBA"), "BABA": lambda: gpt2.gpt2_ioi("BABA")},
        "multitask": {
            o: (lambda o=o: _organism(f"ioi_{o.lower()}", lang.ioi_prompts, (0, 2), order=o,
                                      corruption="flip"))
            for o in ("ABBA", "BABA")
        },
    },
    "recall": {
        "gpt2": {"michelle": gpt2.gpt2_name_recall_michelle, "names": gpt2.gpt2_name_recall},
        "multitask": {
            "michelle": lambda: _organism("recall_single", lang.recall_prompts, (0,)),
            "names": lambda: _organism("recall_distractor", lang.recall_prompts, (2, 3, 4)),
        },
    },
    "contraction": {
        "gpt2": {"contracted": gpt2.gpt2_contraction},
        "multitask": {"contracted": lambda: _organism(
            "contraction", lang.contraction_prompts, (0, 2), style="contracted")},
    },
    "gender": {
        "gpt2": {"nouns": gpt2.gpt2_gender},
        "multitask": {"nouns": lambda: _organism("gender", lang.gender_prompts, (0,),
                                                gender="male")},
    },
}


# Families for a model with no reference of its shape (a real pretrained model): the published
# experiments' English, with more names, fitted to the subject's tokenizer (``prompts.fit``:
# a name or word that is not one token there drops its prompts), then split in two.
ANY: dict[str, dict[str, Callable[[], PromptFamily]]] = {
    "ioi": {o: (lambda o=o: gpt2.any_ioi(o)) for o in ("ABBA", "BABA")},
    "recall": {"names": gpt2.any_name_recall},
    "contraction": {"contracted": gpt2.gpt2_contraction},
    "gender": {"nouns": gpt2.gpt2_gender},
}
SPLIT_SEED = 0  # the split of a family into the half roles are cast on and the half confirmed on
MIN_HALF = 4  # prompts each half needs: fewer cannot carry a bootstrap CI or a mean


@dataclass(frozen=True)
class Split:
    """A family fitted to a subject's tokenizer, split in two disjoint halves: the components
    are found on ``discover`` and the mechanism is confirmed on ``confirm`` (no double
    dipping). ``whole`` is both together (the effect-size guard and heatmaps)."""

    whole: TokenizedFamily
    discover: TokenizedFamily
    confirm: TokenizedFamily
    seed: int


def split_on(task: str, subject, kind: str, record=None, guard: bool = True) -> Split:
    """The ``kind`` family of ``task`` for a subject with no reference of its shape: the
    real-language family (``ANY``) fitted to its tokenizer and split with ``SPLIT_SEED``
    (recorded). Skips, saying why, when the tokenizer cannot express a family large enough to
    split; with ``guard``, the effect-size guard runs on the whole family (inconclusive when
    the model does not tell clean from corrupted)."""
    build = ANY.get(task, {}).get(kind)
    if build is None:
        pytest.skip(f"no {task!r} family {kind!r} is written for a model with no reference of "
                    f"its shape (families for any tokenizer: {sorted(ANY.get(task, {}))})")
    fam = build()
    try:
        whole, dropped = fit(fam, subject.model)
    except PromptError as exc:
        pytest.skip(f"this checkpoint's tokenizer cannot express the {task!r} family {kind!r}: "
                    f"{str(exc).splitlines()[0]}")
    if whole.n_prompts < 2 * MIN_HALF:
        pytest.skip(f"this checkpoint's tokenizer expresses only {whole.n_prompts} of the "
                    f"{len(fam)} prompts of the {task!r} family {kind!r} (two halves of "
                    f"{MIN_HALF} are needed); left out: " + "; ".join(dropped[:3]))
    a, b = whole.split(SPLIT_SEED)
    if record is not None:
        record.split(fam.name, SPLIT_SEED, a, b, dropped)
    if guard:
        _guard(task, kind, subject, whole, record)
    return Split(whole, whole.subset(a), whole.subset(b), SPLIT_SEED)


def _guard(task: str, kind: str, subject, fam: TokenizedFamily, record) -> None:
    metric = fam.logit_diff()
    clean = float(metric(run(subject.model, fam.clean, logits_at=-1)[0]).mean())
    corrupted = float(metric(run(subject.model, fam.corrupted, logits_at=-1)[0]).mean())
    effect_size(clean, corrupted, f"{task} family {kind!r}, mean logit diff", record)


def kinds(task: str) -> list[str]:
    """Every family kind of ``task`` (the claims' ``family`` parameter)."""
    return sorted({k for ref in FAMILIES[task].values() for k in ref})


def family(task: str, reference: str, kind: str) -> PromptFamily:
    """The ``kind`` family of ``task`` for ``reference``, or a skip saying there is none."""
    mine = FAMILIES[task].get(reference, {})
    if kind not in mine:
        pytest.skip(f"no {task!r} family {kind!r} is written for {reference}")
    return mine[kind]()


def measured_on(task: str, subject, refs: dict, kind: str, record=None, guard: bool = True):
    """``(expectations, tokenized family)``: what ``refs`` expects of ``subject`` (see
    ``mechtests.suite.claims.reference``) and the ``kind`` family of ``task`` written for it.

    ``guard`` (every mechanism claim): the effect-size guard. The family's metric must differ
    between its clean and corrupted prompts by at least a logit, else the claim is
    *inconclusive*: patching restorations, knockout fractions and attributions of a model that
    does not tell clean from corrupted mean nothing. A behaviour claim measuring that very
    difference passes ``guard=False``."""
    name, ref = reference(subject, refs)
    fam = family(task, name, kind).tokenize(subject.model)
    if guard:
        _guard(task, kind, subject, fam, record)
    return ref, fam


def expressed_on(task: str, subject, refs: dict, kind: str):
    """``(expectations, tokenized family)`` for a behaviour claim, which names no component and
    so runs on any checkpoint whose tokenizer can express one of its prompt families: the
    family of the subject's own reference (or one of its shape) first, then every other
    reference's ``kind`` family in turn. Skips, saying why each could not be expressed, when
    none can."""
    shape = shape_of(subject.model)
    order = sorted(refs, key=lambda n: (n != subject.name, reference_shape(n) != shape))
    why = []
    for name in order:
        build = FAMILIES[task].get(name, {}).get(kind)
        if build is None:
            continue
        try:
            return refs[name], build().tokenize(subject.model)
        except ValueError as exc:  # PromptError, matched by name too: a test harness that
            if not isinstance(exc, PromptError) and type(exc).__name__ != "PromptError":
                raise  # re-imports modules in process can hold two copies of the class
            why.append(f"{name}'s: {str(exc).strip().splitlines()[0]}")
    pytest.skip(f"this checkpoint's tokenizer cannot express the {task!r} prompt family "
                f"{kind!r} of any reference (" + "; ".join(why) + ")")
