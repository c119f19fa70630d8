"""Residual stream patching restores the answer, and where it does tells the story.

"Michelle Jones was a top-notch student. Michelle" -> " Jones" (GPT-2 small, no BOS), corrupted
with " Smith"; metric logit(" Jones") - logit(" Smith") at the last position; the clean
resid_pre of each (layer, position) is patched into the corrupted run, one at a time, and the
restoration normalised (0 corrupted, 1 clean). Published shape (an activation patching course
exercise): position 0 has no effect; the surname position carries the answer through the early
and middle layers; the positions in between have no effect; the last position matters only in
late layers. Also measured on a family of name-recall prompts (several first names, surnames
and templates). The organism's layer ranges come from its own analysis (FINDINGS.md).

On a model with no reference of its shape (a real pretrained model) the positions are the
family's named ones (the surname, the last position) and the layer ranges are stated relative to
that model's depth, with restoration normalised on it (1.0 = full restoration):

* ``names`` (the name-recall family fitted to its tokenizer, ``split_on``): on the discovery half
  the layers are found: the surname carries the answer (restoration >= ``CARRIES``) from layer 0
  through layer ``L_s``, the last position from layer ``L_e`` on. The published shape says
  "early and middle" and "late": ``L_s`` reaches at least the first half of the layers and
  ``L_e`` lies in the second half. On the held-out half: the surname carries through ``L_s``, the
  last position from ``L_e`` on, the surname no longer does from ``L_e`` on, and the last position
  has no effect (``NO_EFFECT``) while the surname still carries. Block ``L_e - 1``'s attention is
  what moves the answer across positions there (an MLP cannot): the claim names it for --mutate.
* ``michelle`` (the published single prompt): one prompt cannot be split, so nothing is found on
  it: GPT-2's own layer ranges, stated relative to depth (the surname carries through the first
  half, the last position carries at the last layer and the surname no longer does, the last
  position has no effect through the first third), are asserted on it as they are. Nothing is
  fitted to the prompt, so it is held out from everything; it names no component (as GPT-2's).

"Nothing elsewhere" on such a model: on the discovery half, the positions (grouped as the first
name's, the surname, those in between, the last) whose restoration reaches ``CARRIES`` at some
layer must be the surname and the last position only; on the held-out half (or the single
prompt) no other position restores more than ``NO_EFFECT`` of any prompt's own clean-corrupted
gap at any layer after the embedding (normalised per prompt: a per-prompt bound normalised by the
family's mean gap would read each prompt's own offset from the mean as an effect).

Each check has a control: the same check with the surname and the last position replaced by two
other positions of each prompt, drawn at random (seeded), must fail.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from claims.families import FAMILIES, kinds, measured_on, split_on
from mechtests.analysis.patching import sweep
from mechtests.core import metrics as M
from mechtests.core.engine import run
from mechtests.core.prompts import PromptError, TokenizedFamily, fit
from mechtests.core.result import Result
from mechtests.suite.claims import effect_size, holds, holds_set, reference, travels
from mechtests.suite.roles import CONTROL_SEED, control


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
    if travels(subject, REFS):
        return carries_anew(subject, kind, record)
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
    if travels(subject, REFS):  # the organism (a reference, not in QUIET) still skips below
        return quiet_anew(subject, kind, record)
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


# -- on a model with no reference of its shape ------------------------------------------------
DEPTH = 0.5  # "early and middle" / "late": the first / second half of the layers (GPT-2: the
# surname carries at layers 0-5 of 12, the last position at 11, nothing there through layer 3)
Positions = tuple[torch.Tensor, torch.Tensor]  # (surname, last position), one of each per prompt


def _single(subject, kind: str, record) -> TokenizedFamily:
    """The published single prompt fitted to the tokenizer, with the effect-size guard."""
    try:
        fam, _ = fit(FAMILIES["recall"]["gpt2"][kind](), subject.model)
    except PromptError as exc:
        pytest.skip(f"this checkpoint's tokenizer cannot express the 'recall' prompt {kind!r}: "
                    f"{str(exc).splitlines()[0]}")
    metric = fam.logit_diff()
    clean = float(metric(run(subject.model, fam.clean, logits_at=-1)[0]).mean())
    corrupted = float(metric(run(subject.model, fam.corrupted, logits_at=-1)[0]).mean())
    effect_size(clean, corrupted, f"recall prompt {kind!r}, logit diff", record)
    return fam


def _sweep(subject, fam: TokenizedFamily) -> Result:
    """resid_pre patching at every (layer, position), clean into corrupted (not normalised)."""
    return sweep(subject.model, "resid_pre", fam.clean, fam.corrupted, fam.logit_diff(),
                 by=("layer", "pos"))


def _scaled(n_layers: int) -> Recall:
    """GPT-2's layer ranges relative to depth (for 12 layers they are GPT-2's own)."""
    return Recall(tuple(range(n_layers // 2)), (n_layers - 1,), tuple(range(n_layers // 3)),
                  (n_layers - 1,))


def _found(norm: Result, fam: TokenizedFamily, record) -> Recall:
    """The layer ranges of the published shape, found on the discovery half: the surname
    carries from layer 0 through ``L_s``, the last position from ``L_e`` on."""
    n = norm.per_prompt.shape[1]
    at_s = _at(norm, range(n), fam.positions["SURNAME"]).mean(0)
    at_e = _at(norm, range(n), fam.positions["END"]).mean(0)
    holds(float(at_e.max()), ">=", CARRIES,
          "largest restoration at the last position, any layer, discovery half",
          "late layers move the answer to the last position", record,
          at=int(at_e.argmax()))
    late = next(i for i in range(n) if at_e[i] >= CARRIES)
    last = next((i - 1 for i in range(n) if at_s[i] < CARRIES), n - 1)
    holds((last + 1) / n, ">=", DEPTH,
          f"fraction of the {n} layers through which the surname carries the answer "
          f"(layers 0-{last}), discovery half",
          "the answer lives at the surname through the early and middle layers: at least the "
          "first half (GPT-2: layers 0-5 of 12)", record)
    holds(late / n, ">=", DEPTH,
          f"depth of the first layer at which the last position carries the answer (layer "
          f"{late} of {n}), discovery half",
          "the last position matters only in late layers: the second half (GPT-2: layer 11 of "
          "12, nothing there through layer 3)", record)
    return Recall(tuple(range(last + 1)), tuple(range(late, n)),
                  tuple(range(min(last, late - 1) + 1)), tuple(range(late, n)),
                  (f"attn_{late - 1}",))


def _others(fam: TokenizedFamily, seed: int = CONTROL_SEED) -> Positions:
    """Two other positions of each prompt (the k-th and l-th that are neither the surname nor
    the last, k and l drawn at random, seeded): the control's stand-ins."""
    surname, end = fam.positions["SURNAME"], fam.positions["END"]
    T = fam.clean.shape[1]
    k, j = random.Random(seed).sample(range(T - 2), 2)
    rest = [[p for p in range(T) if p not in (int(s), int(e))] for s, e in zip(surname, end)]
    return torch.tensor([r[k] for r in rest]), torch.tensor([r[j] for r in rest])


def _control(check: Callable[[Positions], None], fam: TokenizedFamily, record) -> None:
    """The same check with the surname and the last position replaced by two other positions
    (``_others``): it must fail, else it does not single out the positions it names."""
    __tracebackhide__ = True
    other = _others(fam)
    control(lambda: check(other), f"positions {other[0].tolist()} for the surname and "
            f"{other[1].tolist()} for the last position", "the surname and the last position",
            record)


def carries_anew(subject, kind: str, record) -> None:
    """The published shape on a model with no reference of its shape: layer ranges found on the
    discovery half (``names``) or GPT-2's relative to depth (``michelle``), asserted on the
    held-out half (or the single prompt)."""
    if kind == "michelle":
        fam = _single(subject, kind, record)
        ranges = _scaled(subject.model.cfg.n_layers)
        half = "the published prompt"
    else:
        split = split_on("recall", subject, kind, record)
        ranges = _found(_sweep(subject, split.discover).restored(), split.discover, record)
        record.cast("where the answer sits", "the layers at which the surname (from layer 0) "
                    "and the last position (from its first) restore at least "
                    f"{CARRIES} (discovery half), and the attention layer between them",
                    [], [f"SURNAME {ranges.surname_layers[0]}-{ranges.surname_layers[-1]}",
                         f"END {ranges.end_layers[0]}-{ranges.end_layers[-1]}",
                         *ranges.movers], {}, [])
        record.components(list(ranges.movers), breaks=("ov",))
        fam, half = split.confirm, "held-out half"
    norm = _sweep(subject, fam).restored()
    record.heatmap(norm, title=f"resid_pre patching, normalised ({kind}, {half})")
    surname, end = fam.positions["SURNAME"], fam.positions["END"]
    holds(float(_at(norm, [0], surname).mean()), ">=", CARRIES,
          "restoration at the surname before layer 0", "by construction: the prompts differ "
          "only there", record, kind="sanity")
    holds(float(_at(norm, [0], end).mean().abs()), "<=", NO_EFFECT,
          "|restoration| at the last position before layer 0", "by construction: the last "
          "token is the same in both runs", record, kind="sanity")
    where = ranges.surname_layers[1:]
    early = [layer for layer in ranges.early_end_layers if layer > 0]

    def check(at: Positions) -> None:
        s, e = at
        if where:
            holds(float(_at(norm, where, s).mean(0).min()), ">=", CARRIES,
                  f"restoration at the surname, worst of layers {where[0]}-{where[-1]}, {half}",
                  "the answer lives at the surname in early and middle layers", record)
        holds(float(_at(norm, ranges.end_layers, e).mean(0).min()), ">=", CARRIES,
              f"restoration at the last position, worst of layers {list(ranges.end_layers)}, "
              f"{half}", "late layers have moved the answer to the last position", record)
        holds(float(_at(norm, ranges.moved_layers, s).mean(0).max()), "<=", 1 - CARRIES,
              f"restoration at the surname, best of layers {list(ranges.moved_layers)}, {half}",
              "by then the answer has moved on from the surname", record)
        if early:
            holds(float(_at(norm, early, e).mean(0).abs().max()), "<=", NO_EFFECT,
                  f"|restoration| at the last position, layers {early[0]}-{early[-1]}, {half}",
                  "early on the last position does not yet hold the answer", record)

    check((surname, end))
    _control(check, fam, record)


GROUPS = ("first name", "SURNAME", "in between", "END")


def _per_prompt(result: Result) -> torch.Tensor:
    """Restoration of each prompt against its own clean and corrupted runs, [n, layer, pos]."""
    clean, corrupted = result.clean_per_prompt, result.corrupted_per_prompt
    return M.restoration(result.per_prompt, clean[:, None, None], corrupted[:, None, None])


def _group(fam: TokenizedFamily) -> torch.Tensor:
    """Each prompt's positions by group (index into ``GROUPS``), [n, pos]."""
    surname, end = fam.positions["SURNAME"][:, None], fam.positions["END"][:, None]
    pos = torch.arange(fam.clean.shape[1])[None]
    return torch.where(pos < surname, 0, torch.where(pos == surname, 1, torch.where(
        pos < end, 2, 3)))


def _carriers(rest: torch.Tensor, fam: TokenizedFamily) -> dict[str, float]:
    """Each group's restoration (its best position in each prompt, averaged over the prompts),
    at its best layer after the embedding."""
    group = _group(fam)
    out = {}
    for g, name in enumerate(GROUPS):
        mask = (group == g)[:, None, :].expand_as(rest)
        if not mask.any():
            continue
        best = rest.masked_fill(~mask, float("-inf")).amax(2)  # [n, layer]
        out[name] = float(best[:, 1:].mean(0).max())
    return out


def quiet_anew(subject, kind: str, record) -> None:
    """Nothing elsewhere, on a model with no reference of its shape: the groups of positions
    that carry the answer on the discovery half are the surname and the last position; on the
    held-out half (``michelle``: the published prompt) no other position has an effect."""
    if kind == "michelle":
        fam, half = _single(subject, kind, record), "the published prompt"
    else:
        split = split_on("recall", subject, kind, record)
        carry = _carriers(_per_prompt(_sweep(subject, split.discover)), split.discover)
        found = [g for g, v in carry.items() if v >= CARRIES]
        record.cast("positions that carry the answer", f"the groups of positions {GROUPS} "
                    f"whose restoration reaches {CARRIES} at some layer after the embedding "
                    "(discovery half)", [], found, {}, [])
        holds_set(["SURNAME", "END"], found, "groups of positions that carry the answer, "
                  "discovery half", "only the surname and the last position carry the answer",
                  record, restoration={g: round(v, 3) for g, v in carry.items()})
        fam, half = split.confirm, "held-out half"
    rest = _per_prompt(_sweep(subject, fam))
    T = rest.shape[2]

    def check(at: Positions) -> None:
        s, e = at
        pos = torch.arange(T)[None]
        elsewhere = ((pos != s[:, None]) & (pos != e[:, None]))[:, None, :].expand_as(rest)
        after = rest[:, 1:].abs().masked_fill(~elsewhere[:, 1:], 0.0)  # [n, layer, pos]
        worst = after.flatten().argmax()
        i, layer, p = (int(x) for x in torch.unravel_index(worst, after.shape))
        holds(float(after.flatten()[worst]), "<=", NO_EFFECT,
              f"largest |restoration| at positions other than those named, any layer after the "
              f"embedding, {half} (prompt {i}, layer {layer + 1}, position {p}: "
              f"{subject.model.tokenizer.decode([int(fam.clean[i, p])])!r})",
              "only the surname and the last position carry the answer: any other within 15% "
              "of the prompt's own clean-corrupted gap", record)

    check((fam.positions["SURNAME"], fam.positions["END"]))
    _control(check, fam, record)
