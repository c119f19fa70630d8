"""Contraction copying: one head moves the earlier contraction to the final pronoun.

"We're helping our friend while they" -> 're (rather than " are"). An application notebook
reports, for GPT-2 small: attention layer 7 and MLPs 8 and 10 matter most; head 7.11 attends
from the final pronoun to the earlier contraction, and patching its values restores more than
patching its pattern. No public reproduction was found (shared/published-values.md): the GPT-2
thresholds are this suite's own hypothesis. Metric: logit(contracted) - logit(full form) at the
last position; corrupted prompts write the earlier verb in full. The organism's head is the one
its own analysis found (FINDINGS.md).
"""

from __future__ import annotations

import pytest

from claims.families import kinds, measured_on
from mechtests import metrics as M
from mechtests.attribution import head_attribution
from mechtests.claims import holds, holds_set
from mechtests.engine import engine_for
from mechtests.heads import attention_between
from mechtests.patching import sweep

REFS = {"gpt2": "7.11", "multitask": "0.3"}  # the contraction mover
SOURCE = "contraction-copying research notebook (GPT-2 small, unreplicated)"
SUBJECTS = list(REFS)
KINDS = kinds("contraction")


@pytest.mark.claim(id="contraction.top_head", source=SOURCE, subjects=SUBJECTS)
@pytest.mark.parametrize("kind", KINDS)
def test_one_head_is_top_by_attribution_and_patching(subject, kind, record, pin):
    head, fam = measured_on("contraction", subject, REFS, kind)
    dla = head_attribution(subject.model, fam.clean, fam.answer_ids, fam.counterfactual_ids)
    patched = sweep(engine_for(subject.model), "z", fam.clean, fam.corrupted, fam.logit_diff(),
                    by=("layer", "head"))
    patched = patched.normalized(patched.meta["clean"], patched.meta["corrupted"])
    for r, title in ((dla, "direct logit attribution"), (patched, "head output patching")):
        record.heatmap(r, title=f"{title} ({kind})")
    holds_set([dla.top_k(1)[0][0]], [head], "top head by direct logit attribution",
              "the mover writes the contracted form", record, top=dla.top_k(3))
    holds_set([patched.top_k(1)[0][0]], [head], "top head by output patching",
              "restoring that one head's output restores the style", record,
              top=patched.top_k(3))
    pin(dla, "head_dla")
    pin(patched, "head_patching")


@pytest.mark.claim(id="contraction.attention", source=SOURCE, subjects=SUBJECTS)
@pytest.mark.parametrize("kind", KINDS)
def test_mover_attends_from_pronoun_to_contraction(subject, kind, record):
    head, fam = measured_on("contraction", subject, REFS, kind)
    layer, h = (int(x) for x in head.split("."))
    end = fam.positions["END"]
    att = attention_between(subject.model, fam.clean, end, fam.positions["V1"])
    # attention relative to a uniform head's share at the last position, 1 / (END + 1)
    est = M.estimate(att.per_prompt[:, layer, h] * (end + 1))
    holds(est.ci_low, ">=", 2.0,
          f"attention of {head} from the pronoun to the contraction, over a uniform share",
          "the mover reads the contraction: at least twice what a uniform head would",
          record, estimate=str(est))


@pytest.mark.claim(id="contraction.values_not_pattern", source=SOURCE, subjects=SUBJECTS)
@pytest.mark.parametrize("kind", KINDS)
def test_value_patching_restores_more_than_pattern(subject, kind, record):
    head, fam = measured_on("contraction", subject, REFS, kind)
    layer, h = (int(x) for x in head.split("."))
    engine = engine_for(subject.model)
    out = {}
    for site in ("v", "pattern"):
        r = sweep(engine, site, fam.clean, fam.corrupted, fam.logit_diff(),
                  by=("layer", "head"), layers=[layer], heads=[h])
        out[site] = r.normalized(r.meta["clean"], r.meta["corrupted"]).values.reshape(-1)[0]
    holds(float(out["v"] - out["pattern"]), ">", 0.0,
          f"value minus pattern restoration of {head}",
          "what it moves (the value) differs between clean and corrupted, where it looks does "
          "not", record, value=float(out["v"]), pattern=float(out["pattern"]))
