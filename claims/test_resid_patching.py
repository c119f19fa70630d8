"""Residual stream patching restores the answer, and where it does tells the story.

"Michelle Jones was a top-notch student. Michelle" -> " Jones" (GPT-2 small, no BOS), corrupted
with " Smith"; metric logit(" Jones") - logit(" Smith") at the last position; the clean
resid_pre of each (layer, position) is patched into the corrupted run, one at a time, and the
restoration normalised (0 corrupted, 1 clean). Published shape (an activation patching course
exercise): position 0 has no effect; the surname position carries the answer through the early
and middle layers; the positions in between have no effect; the last position matters only in
late layers. Also measured on a family of name-recall prompts (several first names, surnames
and templates). The organism's layer ranges come from its own analysis (FINDINGS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from claims.families import kinds, measured_on
from mechtests.analysis.patching import sweep
from mechtests.suite.claims import holds, reference


@dataclass(frozen=True)
class Recall:
    surname_layers: tuple[int, ...]  # layers whose resid_pre at the surname restores the answer
    end_layers: tuple[int, ...]  # layers whose resid_pre at the last position restores it
    early_end_layers: tuple[int, ...]  # layers where patching the last position does nothing
    moved_layers: tuple[int, ...]  # layers by which the surname no longer holds the answer
    movers: tuple[str, ...] = ()  # what moves the answer from the surname (for --mutate)


REFS = {
    # no head is named for GPT-2 (the exercise is about positions): --mutate says so
    "gpt2": Recall(tuple(range(0, 6)), (11,), (0, 1, 2, 3), (11,)),
    # the organism's layer-0 attention moves the surname to the last position. Head 0.0 does
    # most of it (FINDINGS.md: END -> SURNAME attention 0.91, patching its output restores
    # 1.04) but not alone: with 0.0's attention or output broken (--mutate) the claim still
    # holds, so the claim names the layer, attn_0
    "multitask": Recall((0,), (2, 3), (0,), (1, 2, 3), ("attn_0",)),
}
# In the organism the surname also spreads to the positions in between at layer 1 (up to 0.45
# restoration at "top"), so "no effect elsewhere" is GPT-2's claim only.
QUIET = {"gpt2": REFS["gpt2"]}
CARRIES = 0.7  # "carries the answer": restores most of the clean logit diff
NO_EFFECT = 0.15  # "no effect": within 15% of the corrupted run
SOURCE = "activation patching course exercise (Michelle Jones); Meng et al. 2022 (causal tracing)"
SUBJECTS = list(REFS)


def restoration(subject, kind, record=None):
    ref, fam = measured_on("recall", subject, REFS, kind, record)
    result = sweep(subject.model, "resid_pre", fam.clean, fam.corrupted,
                   fam.logit_diff(), by=("layer", "pos"))
    norm = result.restored()
    return ref, fam, norm


def _at(norm, layers, positions: torch.Tensor) -> torch.Tensor:
    """Per-prompt restoration at each prompt's own position, [n_prompts, len(layers)]."""
    pp = norm.per_prompt[:, list(layers)]  # [n, layers, T]
    return pp.gather(2, positions[:, None, None].expand(-1, len(layers), 1))[..., 0]


@pytest.mark.claim(id="recall.resid_patching", source=SOURCE, subjects=SUBJECTS)
@pytest.mark.parametrize("kind", kinds("recall"))
def test_surname_then_last_position_carry_the_answer(subject, kind, record, pin):
    """Evidence: late layers carry the answer at the last position, and by then it has left
    the surname. Two of the published shape's statements hold by construction (clean and
    corrupted differ only at the surname token): restoration at the surname before any layer
    has run is exactly 1, and at the last position before any attention has moved anything
    it is 0 (about 1e-8 on every model). They are kept as sanity checks of the sweep, reported
    as such, never as evidence."""
    ref, fam, norm = restoration(subject, kind, record)
    if ref.movers:
        # a claim about where the answer sits, layer by layer: what moves it is the layer's
        # output. (--mutate: with layer 0's attention made uniform it still leaves the surname
        # by layer 1, restoration there -0.09, and reaches the last position, 1.09-1.53: uniform
        # attention copies it there too, the clean-corrupted gap falling to 5.5; with layer 0's
        # output gone the model no longer recalls: inconclusive.)
        record.components(list(ref.movers), breaks=("ov",))
    record.heatmap(norm, title=f"resid_pre patching, normalised ({kind})")
    surname, end = fam.positions["SURNAME"], fam.positions["END"]
    first = [layer for layer in ref.surname_layers if layer == 0]
    later = [layer for layer in ref.surname_layers if layer > 0]
    if first:
        holds(float(_at(norm, first, surname).mean(0).min()), ">=", CARRIES,
              "restoration at the surname before layer 0",
              "by construction: the prompts differ only there", record, kind="sanity")
    if later:
        holds(float(_at(norm, later, surname).mean(0).min()), ">=", CARRIES,
              f"restoration at the surname, worst of layers {later}",
              "the answer lives at the surname in early and middle layers", record)
    holds(float(_at(norm, ref.end_layers, end).mean(0).min()), ">=", CARRIES,
          f"restoration at the last position, worst of layers {list(ref.end_layers)}",
          "late layers have moved the answer to the last position", record)
    holds(float(_at(norm, ref.moved_layers, surname).mean(0).max()), "<=", 1 - CARRIES,
          f"restoration at the surname, best of layers {list(ref.moved_layers)}",
          "by then the answer has moved on from the surname", record)
    by_construction = [layer for layer in ref.early_end_layers if layer == 0]
    early = [layer for layer in ref.early_end_layers if layer > 0]
    if by_construction:
        holds(float(_at(norm, by_construction, end).mean(0).abs().max()), "<=", NO_EFFECT,
              "|restoration| at the last position before layer 0",
              "by construction: the last token is the same in both runs", record, kind="sanity")
    if early:
        holds(float(_at(norm, early, end).mean(0).abs().max()), "<=", NO_EFFECT,
              f"|restoration| at the last position, layers {early}",
              "early on the last position does not yet hold the answer", record)
    pin(norm, "resid_pre_restoration")


@pytest.mark.claim(id="recall.no_effect_elsewhere", source=SOURCE, subjects=list(QUIET))
@pytest.mark.parametrize("kind", kinds("recall"))
def test_first_and_in_between_positions_have_no_effect(subject, kind, record):
    reference(subject, QUIET)
    _, fam, norm = restoration(subject, kind, record)
    pp = norm.per_prompt  # [n, layer, T]
    n, _, T = pp.shape
    pos = torch.arange(T)
    surname, end = fam.positions["SURNAME"], fam.positions["END"]
    # positions strictly after the surname and before the last token, plus position 0 when it
    # is not the surname itself
    between = (pos[None] > surname[:, None]) & (pos[None] < end[:, None])
    first = (pos[None] == 0) & (surname[:, None] != 0)
    mask = (between | first)[:, None, :].expand_as(pp)
    worst = float(pp.abs().masked_select(mask).max()) if mask.any() else 0.0
    holds(worst, "<=", NO_EFFECT, "largest |restoration| at the first and in-between positions",
          "only the surname and the last position carry the answer", record)
