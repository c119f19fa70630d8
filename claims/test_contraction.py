"""Contraction copying: one head moves the earlier contraction to the final pronoun.

"We're helping our friend while they" -> 're (rather than " are"). An application notebook
reports, for GPT-2 small: attention layer 7 and MLPs 8 and 10 matter most; head 7.11 attends
from the final pronoun to the earlier contraction, and patching its values restores more than
patching its pattern. No public reproduction was found (shared/published-values.md): the GPT-2
thresholds are this suite's own hypothesis. Metric: logit(contracted) - logit(full form) at the
last position; corrupted prompts write the earlier verb in full. The organism's head is the one
its own analysis found (FINDINGS.md).

The organism's claim is about its family as written: templates 0 and 2 of the contraction
language, taken together. Which of its heads moves the style depends on where the cue sits:
with the cue late (template 2, "at the PLACE P1 V1 ..."), 0.3 is top by both measures (DLA 1.49,
patching 0.55); with the cue at position 2 (template 0, "P1 V1 ADJ at ..."), 1.3 is top by
direct logit attribution (0.96, 0.3 not in the top 3) and 0.0, a layer-0 head that reads the cue
by position, by patching (0.35, 0.3 next at 0.28). FINDINGS.md's template-0 analysis names 3.2
and 0.0 for that reason. So "0.3 is the contraction mover" is a claim about this mixed family,
not about every contraction prompt (tests/test_claims_break.py checks template 0 alone).

The mover is named by role as well as by index (``mechtests.suite.roles``): the head with the
largest positive direct logit attribution; on the reference it must be the head named here.

Norm-based attention (Kobayashi et al. 2020, ``attention_between(..., weighting="norm")``)
leaves the organism's story as it is: 0.3's share from the pronoun to the contraction is .45 of
its attention and .48 of what it moves. Where it would change the story is a head whose output
is broken: with 0.3's output weights zeroed its raw pattern is unchanged (they do not enter it)
while the norm view gives it 0. The attention claim is about where the head looks, so it reads
the raw pattern; the attribution and patching claims are the ones that see the output.

On a model with no reference of its shape (a real pretrained model) the mover is cast anew on
one seeded half of the same English family fitted to its tokenizer (``split_on``) and every
check runs on the other half: the mover is the head beyond layer 0 with the largest positive
direct logit attribution to the contracted form among the heads that attend from the pronoun to
the earlier contraction at least twice a uniform head's share (the notebook's two sentences
about 7.11, on the discovery half). On the held-out half it must be among the top
``TOP_RANK`` of all the model's heads by direct logit attribution and by output patching, its
attention to the contraction must still be twice a uniform share (95% CI), and its values must
restore more beyond its pattern than all but ``TOP_RANK - 1`` other heads. Each has the control
of ``roles.verdict``: the same check on another head drawn at random must fail.
"""

from __future__ import annotations

import pytest

from claims.families import Split, kinds, measured_on, split_on
from mechtests.analysis.attribution import head_attribution
from mechtests.analysis.heads import attention_between
from mechtests.analysis.patching import sweep
from mechtests.core import metrics as M
from mechtests.core import sites
from mechtests.core.result import Result
from mechtests.suite.claims import holds, holds_set, reference, travels
from mechtests.suite.roles import Cast, Role, by_head, cast, verdict

REFS = {"gpt2": "7.11", "multitask": "0.3"}  # the contraction mover
SOURCE = "contraction-copying research notebook (GPT-2 small, unreplicated)"
SUBJECTS = list(REFS)
KINDS = kinds("contraction")


MOVER = Role("contraction mover", "the head with the largest positive direct logit "
             "attribution to the contracted form")


# -- on a model with no reference of its shape: cast on one half, checked on the other ----------
ATTENDS = 2.0  # attention from the pronoun to the contraction, over a uniform head's share
TOP_RANK = 3
TOP_WHY = ("one head moves the style: among the top three of all the model's heads on held-out "
           "prompts (on GPT-2's 144 heads the notebook has 7.11 first; top 1 would ask a "
           "seven-prompt half to reproduce the discovery half's exact order)")
ANY_MOVER = Role("contraction mover", "the head beyond layer 0 with the largest positive direct "
                 "logit attribution to the contracted form among those attending from the "
                 f"pronoun to the earlier contraction at least {ATTENDS:g}x a uniform share "
                 "(discovery half)")


def _to_contraction(subject, fam) -> Result:
    """Attention from the last position to the earlier contraction, over a uniform share."""
    end = fam.positions["END"]
    att = attention_between(subject.model, fam.clean, end, fam.positions["V1"])
    scaled = att.per_prompt * (end + 1)[:, None, None]
    return Result("attention over a uniform share", att.axes, att.labels, scaled.mean(0), scaled)


def mover_anew(subject, split: Split, record) -> Cast:
    """Who plays the contraction mover on a model with no reference of its shape, cast on the
    discovery half."""
    fam = split.discover
    dla = head_attribution(subject.model, fam.clean, fam.answer_ids, fam.counterfactual_ids)
    att = _to_contraction(subject, fam).values

    def attends(h: sites.Head) -> bool:
        return h.layer > 0 and float(att[h.layer, h.head]) >= ATTENDS

    return cast(subject, None, ANY_MOVER, (), by_head(dla), record, n=1, floor=0.0,
                eligible=attends)


def _rank(values, head: sites.Head) -> int:
    """1 for the head with the largest value of all heads."""
    return int((values > values[head.layer, head.head]).sum()) + 1


def top_head_anew(subject, kind: str, record) -> None:
    split = split_on("contraction", subject, kind, record)
    moving = mover_anew(subject, split, record)
    record.components(list(moving.components))
    fam = split.confirm
    dla = head_attribution(subject.model, fam.clean, fam.answer_ids, fam.counterfactual_ids)
    patched = sweep(subject.model, "z", fam.clean, fam.corrupted, fam.logit_diff(),
                    by=("layer", "head")).restored()
    for r, title in ((dla, "direct logit attribution"), (patched, "head output patching")):
        record.heatmap(r, title=f"{title} ({kind}, confirmation half)")

    def check(found):
        (h,) = sites.heads(found)
        holds(_rank(dla.values, h), "<=", TOP_RANK, f"rank of {h} among all heads by direct "
              "logit attribution, held-out half", TOP_WHY, record, dla=dla.at(
                  layer=h.layer, head=h.head), top=dla.top_k(3))
        holds(_rank(patched.values, h), "<=", TOP_RANK, f"rank of {h} among all heads by output "
              "patching (normalised restoration), held-out half", TOP_WHY, record,
              restored=patched.at(layer=h.layer, head=h.head), top=patched.top_k(3))

    verdict(moving, check, record)


def attention_anew(subject, kind: str, record) -> None:
    split = split_on("contraction", subject, kind, record)
    moving = mover_anew(subject, split, record)
    record.components(list(moving.components), breaks=("qk",))
    att = _to_contraction(subject, split.confirm)
    record.heatmap(att, title=f"attention pronoun -> contraction over a uniform share ({kind}, "
                              "confirmation half)")

    def check(found):
        (h,) = sites.heads(found)
        est = M.estimate(att.per_prompt[:, h.layer, h.head])
        holds(est.ci_low, ">=", ATTENDS, f"attention of {h} from the pronoun to the contraction, "
              "over a uniform share, held-out half", "the mover reads the contraction: at "
              "least twice what a uniform head would", record, estimate=str(est))

    verdict(moving, check, record)


def values_anew(subject, kind: str, record) -> None:
    split = split_on("contraction", subject, kind, record)
    moving = mover_anew(subject, split, record)
    record.components(list(moving.components))
    fam = split.confirm
    out = {site: sweep(subject.model, site, fam.clean, fam.corrupted, fam.logit_diff(),
                       by=("layer", "head")).restored() for site in ("v", "pattern")}
    # grouped-query attention: a head's values are its key-value head's, shared by the group
    group = out["pattern"].values.shape[1] // out["v"].values.shape[1]
    value = out["v"].values.repeat_interleave(group, dim=1)
    diff = value - out["pattern"].values

    def check(found):
        (h,) = sites.heads(found)
        whose = "" if group == 1 else f" (its values: key-value head {h.head // group}'s)"
        holds(_rank(diff, h), "<=", TOP_RANK, f"rank of {h} among all heads by value minus "
              f"pattern restoration{whose}, held-out half", "what the mover moves (its value) "
              "differs between clean and corrupted, where it looks does not: " + TOP_WHY,
              record, value=float(value[h.layer, h.head]),
              pattern=float(out["pattern"].values[h.layer, h.head]),
              best=float(diff.max()))

    verdict(moving, check, record)


def mover(subject, head: str, fam, record) -> tuple[Cast, Result]:
    """Who plays the contraction mover's role on ``subject`` (``roles.cast``), and the DLA."""
    name, _ = reference(subject, REFS)
    dla = head_attribution(subject.model, fam.clean, fam.answer_ids, fam.counterfactual_ids)
    return cast(subject, name, MOVER, [head], by_head(dla), record, floor=0.0), dla


@pytest.mark.claim(id="contraction.top_head", source=SOURCE, subjects=SUBJECTS)
@pytest.mark.parametrize("kind", KINDS)
def test_one_head_is_top_by_attribution_and_patching(subject, kind, record, pin):
    """The mover (by role: top by direct logit attribution) is also top by output patching;
    on the reference it is the named head."""
    if travels(subject, REFS):
        return top_head_anew(subject, kind, record)
    head, fam = measured_on("contraction", subject, REFS, kind, record)
    moving, dla = mover(subject, head, fam, record)
    record.components(list(moving.components))
    patched = sweep(subject.model, "z", fam.clean, fam.corrupted, fam.logit_diff(),
                    by=("layer", "head"))
    patched = patched.restored()
    for r, title in ((dla, "direct logit attribution"), (patched, "head output patching")):
        record.heatmap(r, title=f"{title} ({kind})")

    def check(found):
        holds_set([dla.top_k(1)[0][0]], found, "top head by direct logit attribution",
                  "the mover writes the contracted form (on this family: templates 0 and 2)",
                  record, top=dla.top_k(3))
        holds_set([patched.top_k(1)[0][0]], found, "top head by output patching",
                  "restoring that one head's output restores the style more than any other "
                  "head's (on this family: templates 0 and 2)", record, top=patched.top_k(3))

    verdict(moving, check, record)
    pin(dla, "head_dla")
    pin(patched, "head_patching")


@pytest.mark.claim(id="contraction.attention", source=SOURCE, subjects=SUBJECTS)
@pytest.mark.parametrize("kind", KINDS)
def test_mover_attends_from_pronoun_to_contraction(subject, kind, record):
    if travels(subject, REFS):
        return attention_anew(subject, kind, record)
    head, fam = measured_on("contraction", subject, REFS, kind, record)
    moving, _ = mover(subject, head, fam, record)
    record.components(list(moving.components), breaks=("qk",))  # where the head looks
    end = fam.positions["END"]
    att = attention_between(subject.model, fam.clean, end, fam.positions["V1"])

    def check(found):
        (h,) = sites.heads(found)
        # attention relative to a uniform head's share at the last position, 1 / (END + 1)
        est = M.estimate(att.per_prompt[:, h.layer, h.head] * (end + 1))
        holds(est.ci_low, ">=", 2.0,
              f"attention of {h} from the pronoun to the contraction, over a uniform share",
              "the mover reads the contraction: at least twice what a uniform head would",
              record, estimate=str(est))

    verdict(moving, check, record)


@pytest.mark.claim(id="contraction.values_not_pattern", source=SOURCE, subjects=SUBJECTS)
@pytest.mark.parametrize("kind", KINDS)
def test_value_patching_restores_more_than_pattern(subject, kind, record):
    """Of all heads, the mover is the one whose values restore the most beyond its pattern.

    Against 0 this asserted almost nothing: on the organism 11 of 16 heads have value minus
    pattern restoration > 0. Against the other heads it singles the mover out (organism: 0.3
    0.41, next 0.2 at 0.23)."""
    if travels(subject, REFS):
        return values_anew(subject, kind, record)
    head, fam = measured_on("contraction", subject, REFS, kind, record)
    moving, _ = mover(subject, head, fam, record)
    record.components(list(moving.components))
    out = {}
    for site in ("v", "pattern"):
        r = sweep(subject.model, site, fam.clean, fam.corrupted, fam.logit_diff(),
                  by=("layer", "head"))
        out[site] = r.restored()
    diff = out["v"].values - out["pattern"].values  # [layer, head]

    def check(found):
        (h,) = sites.heads(found)
        mine = float(diff[h.layer, h.head])
        others = diff.clone()
        others[h.layer, h.head] = float("-inf")
        best = int(others.flatten().argmax())
        rival = str(sites.Head(best // diff.shape[1], best % diff.shape[1]))
        holds(mine - float(others.flatten()[best]), ">", 0.0,
              f"value minus pattern restoration of {h}, minus the best other head's ({rival})",
              "what the mover moves (its value) differs between clean and corrupted, where it "
              "looks does not; no other head's value carries the style as much", record,
              value=float(out["v"].values[h.layer, h.head]),
              pattern=float(out["pattern"].values[h.layer, h.head]),
              rival=float(others.flatten()[best]))

    verdict(moving, check, record)
