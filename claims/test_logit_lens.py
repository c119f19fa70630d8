"""Logit lens and module contributions on IOI: where the answer appears, and who writes it.

GPT-2 small on the 8 IOI prompts of the Exploratory Analysis Demo (logit(IO) - logit(S)):
the accumulated residual stream, read through the final LayerNorm and unembedding, is about 0
through 7_pre, 0.25 at 7_mid, 0.45 at 8_mid, then jumps to 5.03 at 9_mid (final 3.55): the answer
appears in the residual stream only with attention layer 9. Direct logit attribution by layer:
attn_9 +4.565 is by far the largest, attn11 -1.442 the most negative, every MLP under 0.16. The
organism's layers come from its own analysis (FINDINGS.md).

On a model with no reference of its shape (a real pretrained model) the writer is found anew on
one seeded half of the ABBA family fitted to its tokenizer (``split_on``) and confirmed on the
other half, in terms relative to that model's own final logit diff and its own modules:

* logit lens: the answer *appears* at the first accumulated-residual reading whose lens reaches
  half of the final logit diff (found on the discovery half). On the held-out half, before it the
  lens does not give the answer (at most ``SILENT`` of the final, toward the answer), the step
  into it is more than that, and from it on the lens says most of the answer (at least half of
  the final at every later reading). "Does not give the answer" is one-sided: a real model's lens
  may lean to one name before any layer has found the indirect object (SmolLM2 leans to S, by
  up to about its final logit diff, and nearly alike, within a quarter of it, on the corrupted
  prompts whose answer is the other name: a prior over the names, not the answer). The
  component written there (``attn_L`` for ``L_mid``) is what the claim names.
* module contributions: the attention or MLP layer with the largest direct logit attribution on
  the discovery half; on the held-out half it is still the largest of all modules, mean-ablating
  it costs more logit diff than mean-ablating any other module of its layer or later (earlier
  ones may feed it), and it writes at least half of the summed positive direct effect.

Both have a control: the same check on another reading / module drawn at random (seeded) must
fail, else the check does not single out the component found.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from claims.families import measured_on, split_on
from mechtests.analysis.attribution import logit_attribution, logit_lens
from mechtests.analysis.patching import ablate
from mechtests.core.result import Result
from mechtests.suite.claims import holds, holds_set, travels
from mechtests.suite.roles import CONTROL_SEED, control


@dataclass(frozen=True)
class Lens:
    silent_until: str  # last accumulated-residual label where the answer is not yet there
    appears: tuple[tuple[str, float], ...]  # (label, minimum fraction of the final logit diff)
    top_components: tuple[str, ...]  # the largest direct logit attributions by layer
    most_negative: str | None


REFS = {
    # ~0 through 7_pre (0.07 at 7_mid); 9_mid is at 5.03 / 3.55 = 1.4
    "gpt2": Lens("7_pre", (("9_mid", 0.8),), ("attn_9",), "attn_11"),
    # the organism writes the answer in two steps (FINDINGS.md; ABBA family: 1_mid 0.30,
    # 3_mid 0.79 of the final 10.5): silent through 1_pre, attn1 and attn3 the top writers
    "multitask": Lens("1_pre", (("1_mid", 0.2), ("3_mid", 0.6)), ("attn_1", "attn_3"), None),
}
def writers(ref: Lens) -> list[str]:
    """The attention layers the claim says write the answer (where it appears)."""
    return [f"attn_{label.split('_')[0]}" for label, _ in ref.appears if label.endswith("_mid")]


SILENT = 0.15  # |fraction of the final logit diff| while the answer is not yet there
SOURCE = "nostalgebraist 2020 (logit lens); TransformerLens Exploratory Analysis Demo"
SUBJECTS = list(REFS)


@pytest.mark.claim(id="ioi.logit_lens", source=SOURCE, subjects=SUBJECTS)
def test_answer_appears_only_from_the_published_layer(subject, record, pin):
    if travels(subject, REFS):
        return appears_anew(subject, record)
    ref, fam = measured_on("ioi", subject, REFS, "ABBA", record)
    # a claim about which layer writes the answer, not about where its heads look: its break
    # is the layers' output. (--mutate: with layer 3's attention made uniform the answer is
    # still written there, +0.17 of a final that fell from 10.5 to 6.5, against +0.45 intact;
    # the organism's 3.3 reads the object word, not a name, FINDINGS.md)
    record.components(writers(ref), breaks=("ov",))
    lens = logit_lens(subject.model, fam.clean, fam.answer_ids, fam.counterfactual_ids)
    record.heatmap(lens, title="logit lens: accumulated residual -> logit diff")
    labels = lens.labels["layer"]
    final = float(lens.values[-1])
    frac = lens.values / final
    until = labels.index(ref.silent_until)
    holds(float(frac[: until + 1].abs().max()), "<=", SILENT,
          f"largest |logit lens / final| up to {ref.silent_until}",
          "the answer is not yet in the residual stream", record, final=final)
    for label, floor in ref.appears:
        at = labels.index(label)
        holds(float(frac[at]), ">=", floor, f"logit lens / final at {label}",
              "the answer has been written by then", record)
        # ... and written there: the step into this label (that layer's attention) is more
        # than what counts as silence. Without it the fraction alone held with that layer's
        # attention broken (the answer was already there from earlier layers, relative to a
        # final that fell with it). Organism: 1_mid +0.32, 3_mid +0.45; GPT-2: 9_mid ~+1.2.
        holds(float(frac[at] - frac[at - 1]), ">=", SILENT,
              f"step of logit lens / final from {labels[at - 1]} to {label}",
              "that layer's attention writes the answer: more than the silence bound", record)
    pin(lens, "logit_lens")


@pytest.mark.claim(id="ioi.module_contributions", source=SOURCE, subjects=SUBJECTS)
def test_one_attention_layer_writes_the_answer(subject, record, pin):
    if travels(subject, REFS):
        return writer_anew(subject, record)
    ref, fam = measured_on("ioi", subject, REFS, "ABBA", record)
    record.components(list(ref.top_components))
    dla = logit_attribution(subject.model, fam.clean, fam.answer_ids, fam.counterfactual_ids)
    record.heatmap(dla, title="direct logit attribution by layer")
    k = len(ref.top_components)
    holds_set([c for c, _ in dla.top_k(k)], ref.top_components, "largest layer attributions",
              "the top writers by direct logit attribution (GPT-2: attn_9 +4.565, by far the "
              "largest; organism: FINDINGS.md)", record, top=dla.top_k(k + 2))
    if ref.most_negative:
        holds_set([dla.top_k(1, largest=False)[0][0]], [ref.most_negative],
                  "most negative layer attribution",
                  "GPT-2's attn_11 writes -1.442 against the answer, the most negative", record)
    # ablation agrees with attribution: mean-ablating the top component costs more than
    # mean-ablating any MLP layer (GPT-2's MLPs each attribute under 0.16 of 3.55)
    layers = range(subject.model.cfg.n_layers)
    top = ref.top_components[0]
    comps = [top] + [f"mlp_{i}" for i in layers]
    ablated = ablate(subject.model, fam.clean, comps, fam.logit_diff(), how="mean",
                     reference=fam.corrupted)
    loss = {c: ablated.clean - float(v) for c, v in zip(comps, ablated.values)}
    worst_mlp = max((c for c in comps[1:]), key=lambda c: loss[c])
    holds(loss[top] - loss[worst_mlp], ">", 0.0,
          f"logit diff lost ablating {top} minus ablating {worst_mlp}",
          "the top writer matters more than any MLP", record, losses=str(loss))
    pin(dla, "layer_dla")


# -- on a model with no reference of its shape ------------------------------------------------
KIND = "ABBA"  # the family the reference claims are measured on
HALF = 0.5  # "the answer is there": half of the final logit diff (GPT-2: 9_mid at 1.4)
SHARE = 0.5  # one module writes the answer: more than every other module toward it together
WRITES = ("the layer where the answer appears", "the first accumulated-residual reading whose "
          f"logit lens reaches {HALF} of the final logit diff (discovery half), and the module "
          "written there")
TOP = ("the top writer", "the attention or MLP layer with the largest direct logit attribution "
       "(discovery half)")


def _control(check: Callable[[str], None], found: str, pool: list[str], record) -> None:
    """The same check on another component drawn at random (seeded) from ``pool``: it must
    fail, else the check does not single out ``found`` (``roles.verdict``'s control, for
    components that are not heads)."""
    __tracebackhide__ = True
    other = random.Random(CONTROL_SEED).choice([c for c in pool if c != found])
    control(lambda: check(other), other, found, record)


def _written_at(label: str, labels: list[str], n_layers: int) -> list[str]:
    """The module(s) whose output is the step from the reading before ``label`` to it."""
    if label == "final_post":
        return [f"mlp_{n_layers - 1}"]
    layer, where = label.split("_")
    if where == "mid":
        return [f"attn_{layer}"]
    if layer == "0":
        return ["embed"]
    before = int(layer) - 1
    if f"{before}_mid" in labels:
        return [f"mlp_{before}"]
    return [f"attn_{before}", f"mlp_{before}"]  # parallel blocks: no resid_mid between


def _lens(subject, fam, tokens=None) -> Result:
    return logit_lens(subject.model, fam.clean if tokens is None else tokens, fam.answer_ids,
                      fam.counterfactual_ids)


def appears_anew(subject, record) -> None:
    """The answer appears at the reading found on the discovery half, and only from there, on
    the held-out half (fractions of that half's own final logit diff)."""
    split = split_on("ioi", subject, KIND, record)
    found_lens = _lens(subject, split.discover)
    labels = found_lens.labels["layer"]
    frac_d = (found_lens.values / float(found_lens.values[-1])).tolist()
    at = next(i for i, f in enumerate(frac_d) if f >= HALF)  # final_post is 1.0
    found = labels[at]
    written = _written_at(found, labels, subject.model.cfg.n_layers)
    record.cast(WRITES[0], WRITES[1], [], [found, *written], {}, [])
    record.components(written, breaks=("ov",))  # the output written there, as the reference
    lens = _lens(subject, split.confirm)
    record.heatmap(lens, title=f"logit lens: accumulated residual -> logit diff ({KIND}, "
                               f"confirmation half)")
    final = float(lens.values[-1])
    frac = lens.values / final
    # what the lens reads on the corrupted prompts (the answer is the other name there): where
    # it reads the same, it carries a prior over the names, not the answer
    corrupted = _lens(subject, split.confirm, split.confirm.corrupted).values / final

    def check(label: str) -> None:
        i = labels.index(label)
        if i > 0:
            holds(float(frac[:i].max()), "<=", SILENT,
                  f"largest logit lens / final before {label}, held-out half",
                  "the answer is not yet in the residual stream: the lens does not favour it "
                  "(GPT-2: about 0 through 7_pre, 0.07 at 7_mid)", record, final=final,
                  lowest=float(frac[:i].min()),
                  clean_minus_corrupted=float((frac[:i] - corrupted[:i]).abs().max()))
            holds(float(frac[i] - frac[i - 1]), ">=", SILENT,
                  f"step of logit lens / final from {labels[i - 1]} to {label}, held-out half",
                  "the answer is written there: more than the silence bound (GPT-2: 8_mid 0.13 "
                  "to 9_mid 1.42)", record)
        worst = int(frac[i:].argmin()) + i
        holds(float(frac[worst]), ">=", HALF,
              f"smallest logit lens / final from {label} on (at {labels[worst]}), held-out half",
              "from there on the residual stream says most of the answer (GPT-2: 1.42 at "
              "9_mid, 0.97 at 11_mid)", record, lens=[round(float(f), 2) for f in frac[i:]])

    check(found)
    _control(check, found, labels[1:], record)


def writer_anew(subject, record) -> None:
    """The module with the largest direct effect on the discovery half: still the largest on the
    held-out half, the costliest to ablate from its layer on, and writing most of the answer."""
    split = split_on("ioi", subject, KIND, record)
    disc, conf = split.discover, split.confirm
    found_dla = logit_attribution(subject.model, disc.clean, disc.answer_ids,
                                  disc.counterfactual_ids)
    modules = [c for c in found_dla.labels["component"] if c.startswith(("attn_", "mlp_"))]
    top = max(modules, key=lambda c: found_dla.at(component=c))
    record.cast(TOP[0], TOP[1], [], [top], {}, [])
    record.components([top])
    dla = logit_attribution(subject.model, conf.clean, conf.answer_ids, conf.counterfactual_ids)
    record.heatmap(dla, title=f"direct logit attribution by layer ({KIND}, confirmation half)")
    value = dict(zip(dla.labels["component"], dla.values.tolist()))
    positive = sum(v for v in value.values() if v > 0)

    def check(module: str) -> None:
        ranked = sorted(value, key=value.__getitem__, reverse=True)
        holds(ranked.index(module) + 1, "<=", 1,
              f"rank of {module} by direct logit attribution among all {len(ranked)} "
              f"components, held-out half", "it writes the answer: the largest direct effect "
              "(GPT-2: attn_9 +4.565, by far the largest)", record, dla=value[module],
              top=[(c, round(value[c], 3)) for c in ranked[:3]])
        # ablation agrees: it costs more than any other module of its layer or later (a module
        # before it may feed it: upstream machinery, not a writer)
        layer = int(module.split("_")[1])
        rivals = [c for c in modules if c != module and int(c.split("_")[1]) >= layer]
        ablated = ablate(subject.model, conf.clean, [module, *rivals], conf.logit_diff(),
                         how="mean", reference=conf.corrupted)
        loss = {c: ablated.clean - float(v) for c, v in zip([module, *rivals],
                                                            ablated.values)}
        rival = max(rivals, key=loss.__getitem__)
        holds(loss[module] - loss[rival], ">", 0.0,
              f"logit diff lost mean-ablating {module} minus ablating {rival}, the costliest "
              f"other module of layers {layer}+, held-out half",
              "the top writer matters more than any module after it", record,
              own=loss[module], rival=loss[rival])
        holds(value[module] / positive, ">=", SHARE,
              f"{module}'s share of the summed positive direct logit attribution, held-out half",
              "one module writes the answer: more than all the others that write toward it "
              "together (GPT-2: attn_9 +4.565 against under 1 for all the others)", record,
              dla=value[module], positive=positive,
              next=[(c, round(value[c], 3)) for c in ranked[1:4]])

    check(top)
    _control(check, top, modules, record)
