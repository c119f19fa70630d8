"""Induction heads (Olsson et al. 2022, "In-context learning and induction heads").

On a random token sequence repeated twice, induction heads attend from each second-half token to
the token right after that token's earlier copy, and a previous-token head in an earlier layer
makes this possible. Knocking the induction heads out raises the loss on the repeated half.

GPT-2 small (TransformerLens Exploratory Analysis Demo, seed 0, 50 random tokens from
[100, 20000) repeated, batch 2, no BOS): induction scores 5.1 .931, 5.5 .926, 6.9 .926,
7.10 .904, 7.2 .851, next highest about .48; previous-token score 4.11 .992. An unseeded rerun
gave .861-.932 for the same five, so the claim asserts membership and a floor of 0.8, not the
exact values.

The induction organism learned a variant (FINDINGS.md): no previous-token head; layer-0 heads
look 3 (and 2) words back, and its layer-1 heads attend to the token 3 after the earlier copy;
knocking them out takes the repeat-half loss from 1.05 to 8.0 nats. Its claim is the same one
with offset 3 and the organism's own floor: attention near 0.6 where a uniform head gets ~0.05.

Heads are named by role as well as by index (``mechtests.suite.roles``): the induction heads are
the heads beyond layer 0 with the highest induction scores, each over the floor; the look-back
head the best look-back score in an earlier layer. On the reference they must be the heads named
here; on another checkpoint of its shape the claims are checked on whoever plays the role (the
seed-7 organism: held, moved 1.3 -> 1.1, 1.2 -> 1.0; its look-back head is gone).

On a model with no reference of its shape (a real pretrained model), the roles are cast anew on
the model's own measurements, with GPT-2's setup where it fits (offset 1, 50 random tokens from
[100, 20000) clear of the tokenizer's special and added tokens, repeated; BOS where the tokenizer
has one): the induction heads are up to five heads (GPT-2 has five) beyond layer 0 with the
best induction scores on random tokens of seed ``DISCOVER_SEED``, each putting at least half of
its attention on the induction target (``ANY_FLOOR``: on GPT-2 that keeps exactly its five,
.85-.93 against .48 next; a uniform head gets ~0.01); the look-back head is the best look-back
score, over the same floor, in a layer before the earliest of them. Each is confirmed on
random tokens of another seed (``CONFIRM_SEED``), and knocking the induction heads out must take
back a share of the repeat half's advantage over the first half (``MIN_GAP_SHARE``) that
knocking out as many other heads, drawn at random, does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mechtests.analysis.heads import offset_scores, repeat_loss, repeated_random_tokens
from mechtests.core import sites
from mechtests.core.result import Result
from mechtests.suite.claims import effect_size, holds, reference, travels
from mechtests.suite.roles import Cast, Role, by_head, cast, verdict


@dataclass(frozen=True)
class Induction:
    induction_heads: tuple[str, ...]
    lookback_heads: tuple[str, ...]  # previous-token heads when offset 1
    offset: int  # attention to the token `offset` after the earlier copy / `offset` back
    floor: float  # minimum score for the named heads
    floor_why: str  # that floor's reason, in words
    n_tokens: int  # length of the random segment (the sequence is twice that)
    vocab_range: tuple[int, int]
    bos: bool


REFS = {
    # GPT-2's five clear 0.8 in both published runs (next head .48); 4.11 scores .992
    "gpt2": Induction(("5.1", "5.5", "6.9", "7.2", "7.10"), ("4.11",), 1, 0.8,
                      "GPT-2's five score .85-.93 in both published runs, the next head .48",
                      50, (100, 20000), False),
    # the organism's heads score .55-.62 (look-back .49-.52): most of their attention
    "induction": Induction(("1.3", "1.2"), ("0.3",), 3, 0.45,
                           "most of the head's attention (the organism's heads score .55-.62, "
                           "look-back .49-.52; a uniform head gets ~0.05)", 10, (2, 293), True),
    # the prose organism (fixtures/organisms/prose/FINDINGS.md): GPT-2's textbook circuit at
    # offset 1; random tokens from its merged BPE tokens (ids 1-256 are the byte alphabet, many
    # never seen in the corpus), BOS + 2 x 23 in its 48 positions; 1.3 .62, 1.1 .61, 0.0 .75.
    # Norm-based (Kobayashi et al. 2020, head_scores(weighting="norm")) the induction heads
    # move .77 and .77 of what they write from the induction target: the rest of their
    # attention lands on tokens whose values are small, so the norm view makes the story
    # clearer, not different; 0.0 stays at .76.
    "prose": Induction(("1.3", "1.1"), ("0.0",), 1, 0.45,
                       "most of the head's attention (the organism's heads score .61-.62, "
                       "previous-token .75; a uniform head gets ~0.04)", 23, (257, 1024), True),
}
SOURCE = "Olsson et al. 2022; TransformerLens Exploratory Analysis Demo"
SUBJECTS = list(REFS)


def repeated_tokens(model, ref: Induction, seed: int) -> torch.Tensor:
    bos = model.tokenizer.bos_token_id if ref.bos else None
    return repeated_random_tokens(ref.n_tokens, batch=8, seed=seed, vocab_range=ref.vocab_range,
                                  bos=bos)


def scores(model, tokens: torch.Tensor, kind: str, ref: Induction) -> Result:
    """``heads.offset_scores`` at the reference's offset (``induction`` or ``lookback``)."""
    return offset_scores(model, tokens, kind, ref.offset, bos=ref.bos)


INDUCTION = Role("induction heads", "the heads beyond layer 0 with the highest induction "
                 "scores, each at least the floor")
LOOKBACK = Role("look-back head", "the head in a layer before the induction heads with the "
                "highest look-back score, at least the floor")


def induction_heads(subject, name: str, ref: Induction, ind: Result, record) -> Cast:
    """Who plays the induction heads' role on ``subject`` (``roles.cast``)."""
    return cast(subject, name, INDUCTION, ref.induction_heads, by_head(ind), record,
                floor=ref.floor, eligible=lambda h: h.layer > 0)


# On a model with no reference of its shape: GPT-2's setup where it fits, two seeds of tokens.
DISCOVER_SEED, CONFIRM_SEED = 0, 1  # the roles are cast on seed 0, confirmed on seed 1
N_INDUCTION = 5  # GPT-2 has five induction heads clearing the floor (5.1, 5.5, 6.9, 7.2, 7.10)
ANY_FLOOR = 0.5
ANY_FLOOR_WHY = ("at least half of the head's attention on the one target: most of it, where "
                 "a uniform head gets ~0.01 (on GPT-2 this floor keeps exactly its five "
                 "induction heads, .85-.93, against .48 next, and 4.11's .99 look-back)")
MIN_GAP_SHARE = 0.1
GAP_WHY = ("a tenth of what the repeat buys (first-half minus repeat-half loss): a real part of "
           "the in-context copying, an order of magnitude above the run-to-run noise of the "
           "mean loss, and modest enough to leave room for backup heads")
ANY_INDUCTION = Role("induction heads", f"up to {N_INDUCTION} heads beyond layer 0 with the "
                     f"highest induction scores (offset 1) on random tokens of seed "
                     f"{DISCOVER_SEED}, each at least {ANY_FLOOR}")
ANY_LOOKBACK = Role("look-back head", "the head in a layer before the earliest induction head "
                    f"with the highest previous-token score on random tokens of seed "
                    f"{DISCOVER_SEED}, at least {ANY_FLOOR}")


def setup_anew(model) -> Induction:
    """GPT-2's setup fitted to ``model``: offset 1, 50 tokens (fewer if the context is short)
    from [100, 20000) cut to the vocabulary and started above any special or added token that
    falls in it, BOS where the tokenizer has one. Names no heads."""
    tok = model.tokenizer
    hi = min(20000, model.cfg.d_vocab)
    added = getattr(tok, "get_added_vocab", dict)().values()
    special = [i for i in (*tok.all_special_ids, *added) if i < hi]
    lo = max(100, max(special, default=-1) + 1)
    if hi - lo < 100:
        pytest.skip(f"this tokenizer leaves only ids {lo}..{hi - 1} of ordinary tokens below "
                    f"20000: too few to draw the random repeated tokens from")
    bos = tok.bos_token_id is not None
    n = min(50, (model.cfg.n_ctx - 1 - bos) // 2)
    return Induction((), (), 1, ANY_FLOOR, ANY_FLOOR_WHY, n, (lo, hi), bos)


def induction_anew(subject, ref: Induction, record) -> tuple[Cast, Result]:
    """Who plays the induction heads' role on a model with no reference of its shape, cast on
    the discovery seed; returns the cast and the discovery scores."""
    tokens = repeated_tokens(subject.model, ref, seed=DISCOVER_SEED)
    ind = scores(subject.model, tokens, "induction", ref)
    heads = cast(subject, None, ANY_INDUCTION, (), by_head(ind), record, n=N_INDUCTION, need=1,
                 floor=ANY_FLOOR, eligible=lambda h: h.layer > 0)
    return heads, ind


@pytest.mark.claim(id="induction.heads", source=SOURCE, subjects=SUBJECTS)
def test_induction_heads_attend_to_the_token_after_the_earlier_copy(subject, record,
                                                                    pin):
    """The induction heads (by role: the heads beyond layer 0 with the highest induction
    scores) each score at least the floor; on the reference they are the named heads."""
    if travels(subject, REFS):
        return induction_heads_anew(subject, record)
    name, ref = reference(subject, REFS)
    tokens = repeated_tokens(subject.model, ref, seed=0)
    ind = scores(subject.model, tokens, "induction", ref)
    record.heatmap(ind, title=f"induction score (offset {ref.offset})")
    heads = induction_heads(subject, name, ref, ind, record)
    record.components(list(heads.components), breaks=("qk",))  # where the heads look

    def check(found):
        for head in sites.heads(found):
            holds(ind.at(layer=head.layer, head=head.head), ">=", ref.floor,
                  f"induction score of {head}", ref.floor_why, record)

    verdict(heads, check, record)
    pin(ind, "induction_scores")


def induction_heads_anew(subject, record) -> None:
    """On a model with no reference of its shape: the heads cast on seed ``DISCOVER_SEED``
    each put at least half of their attention on the induction target on seed
    ``CONFIRM_SEED`` too; as many other heads, drawn at random, must not."""
    ref = setup_anew(subject.model)
    heads, _ = induction_anew(subject, ref, record)
    record.components(list(heads.components), breaks=("qk",))
    ind = scores(subject.model, repeated_tokens(subject.model, ref, seed=CONFIRM_SEED),
                 "induction", ref)
    record.heatmap(ind, title=f"induction score (offset 1, seed {CONFIRM_SEED})")

    def check(found):
        for head in sites.heads(found):
            holds(ind.at(layer=head.layer, head=head.head), ">=", ANY_FLOOR,
                  f"induction score of {head} on held-out random tokens (seed {CONFIRM_SEED})",
                  ANY_FLOOR_WHY, record)

    verdict(heads, check, record)


@pytest.mark.claim(id="induction.previous_token", source=SOURCE, subjects=SUBJECTS)
def test_a_previous_token_head_feeds_them(subject, record, pin):
    """The look-back head (by role: the best look-back score in a layer before the induction
    heads) clears the floor; on the reference it is the named head."""
    if travels(subject, REFS):
        return previous_token_anew(subject, record)
    name, ref = reference(subject, REFS)
    tokens = repeated_tokens(subject.model, ref, seed=0)
    back = scores(subject.model, tokens, "lookback", ref)
    record.heatmap(back, title=f"look-back score (offset {ref.offset})")
    ind = scores(subject.model, tokens, "induction", ref)
    heads = induction_heads(subject, name, ref, ind, record)
    first = min((h.layer for h in sites.heads(heads.components)), default=0)
    lookback = cast(subject, name, LOOKBACK, ref.lookback_heads, by_head(back), record,
                    floor=ref.floor, eligible=lambda h: h.layer < first)
    record.components(list(lookback.components), breaks=("qk",))

    def check(induction, looking_back):
        layers = [h.layer for h in sites.heads(induction)]
        for head in sites.heads(looking_back):
            holds(head.layer, "<", min(layers), f"layer of look-back head {head}",
                  "it must sit before the induction heads it feeds", record, kind="sanity")
            holds(back.at(layer=head.layer, head=head.head), ">=", ref.floor,
                  f"look-back score of {head} (offset {ref.offset})", ref.floor_why, record)

    verdict([heads, lookback], check, record)
    pin(back, "previous_token_scores")


def previous_token_anew(subject, record) -> None:
    """On a model with no reference of its shape: the look-back head cast on seed
    ``DISCOVER_SEED`` (before the earliest induction head cast there) puts at least half of its
    attention on the previous token on seed ``CONFIRM_SEED`` too; other heads drawn at random
    must not."""
    ref = setup_anew(subject.model)
    heads, _ = induction_anew(subject, ref, record)
    found = scores(subject.model, repeated_tokens(subject.model, ref, seed=DISCOVER_SEED),
                   "lookback", ref)
    first = min((h.layer for h in sites.heads(heads.found)), default=0)
    lookback = cast(subject, None, ANY_LOOKBACK, (), by_head(found), record, n=1,
                    floor=ANY_FLOOR, eligible=lambda h: h.layer < first)
    record.components(list(lookback.components), breaks=("qk",))
    back = scores(subject.model, repeated_tokens(subject.model, ref, seed=CONFIRM_SEED),
                  "lookback", ref)
    record.heatmap(back, title=f"previous-token score (seed {CONFIRM_SEED})")

    def check(induction, looking_back):
        earliest = min(h.layer for h in sites.heads(induction))
        for head in sites.heads(looking_back):
            holds(back.at(layer=head.layer, head=head.head), ">=", ANY_FLOOR,
                  f"previous-token score of {head} on held-out random tokens "
                  f"(seed {CONFIRM_SEED})", ANY_FLOOR_WHY, record)
            holds(head.layer, "<", earliest, f"layer of look-back head {head}",
                  "it must sit before the induction heads it feeds", record, kind="sanity")

    verdict([heads, lookback], check, record)


def second_copy_loss(model, tokens: torch.Tensor, ref: Induction, heads=()) -> float:
    """Mean loss over the second copy's tokens 2..n, ``heads`` zero-ablated
    (``heads.repeat_loss``)."""
    return repeat_loss(model, tokens, heads, bos=ref.bos).at(copy="second")


@pytest.mark.claim(id="induction.ablation", source=SOURCE, subjects=SUBJECTS)
def test_knocking_out_induction_heads_raises_repeat_loss(subject, record):
    """Knocking the induction heads out raises the repeat-half loss, and each one's own share
    of that is real: the set alone asserted only its strongest member (organism: every pair
    with 1.3 passed, every pair without it failed, nothing checked 1.2)."""
    if travels(subject, REFS):
        return ablation_anew(subject, record)
    name, ref = reference(subject, REFS)
    ind = scores(subject.model, repeated_tokens(subject.model, ref, seed=0), "induction", ref)
    cast_ = induction_heads(subject, name, ref, ind, record)
    record.components(list(cast_.components))
    tokens = repeated_tokens(subject.model, ref, seed=1)
    clean = repeat_loss(subject.model, tokens, bos=ref.bos)
    before = clean.at(copy="second")
    # guard: the model must predict the repeat far better than the first copy, else there is
    # no induction effect to knock out
    effect_size(clean.at(copy="first"), before,
                "first-copy minus repeat-half loss (nats)", record)

    def check(heads):
        after = second_copy_loss(subject.model, tokens, ref, heads)
        # The repeated half is nearly free to predict with induction (GPT-2: ~0.18 nats
        # against ~12 for the first half); without it, it is a random token again. Doubling
        # the loss plus one nat is far below that gap and far above run-to-run noise.
        holds(after, ">=", 2 * before + 1.0,
              "repeat-half loss with the induction heads knocked out",
              "at least twice the loss plus one nat: far below the first-copy gap, far above "
              "noise", record, before=before, heads=list(heads))
        for head in heads:
            rest = tuple(h for h in heads if h != head)
            without = second_copy_loss(subject.model, tokens, ref, rest)
            holds(after - without, ">=", 1.0,
                  f"repeat-half loss added by knocking out {head} on top of the other named "
                  "heads", "each named head carries at least one nat of the effect itself (the "
                  "same nat of margin over noise as above)", record, with_it=after,
                  without_it=without)

    verdict(cast_, check, record)


def ablation_anew(subject, record) -> None:
    """On a model with no reference of its shape: zero-ablating the induction heads cast on
    seed ``DISCOVER_SEED`` takes back at least ``MIN_GAP_SHARE`` of the repeat half's advantage
    on seed ``CONFIRM_SEED``, and each of them carries its part of that bar on top of the
    others; knocking out as many other heads, drawn at random, must not."""
    ref = setup_anew(subject.model)
    heads, _ = induction_anew(subject, ref, record)
    record.components(list(heads.components))
    tokens = repeated_tokens(subject.model, ref, seed=CONFIRM_SEED)
    clean = repeat_loss(subject.model, tokens, bos=ref.bos)
    first, before = clean.at(copy="first"), clean.at(copy="second")
    # guard: the model must predict the repeat far better than the first copy, else there is
    # no induction effect to knock out
    effect_size(first, before, "first-copy minus repeat-half loss (nats)", record)
    bar = MIN_GAP_SHARE * (first - before)

    def check(names):
        after = second_copy_loss(subject.model, tokens, ref, names)
        holds((after - before) / (first - before), ">=", MIN_GAP_SHARE,
              f"share of the repeat half's advantage taken back by knocking out {list(names)} "
              f"(held-out seed {CONFIRM_SEED})", GAP_WHY, record, first_half=first,
              repeat_half=before, knocked_out=after)
        for head in names:
            rest = tuple(h for h in names if h != head)
            without = second_copy_loss(subject.model, tokens, ref, rest)
            holds(after - without, ">=", bar / len(names),
                  f"repeat-half loss added by knocking out {head} on top of the other named "
                  f"heads (nats)", f"each named head carries an equal part of the bar "
                  f"({MIN_GAP_SHARE} of the gap over {len(names)} heads) itself: none is a "
                  f"passenger of the strongest", record, with_it=after, without_it=without)

    verdict(heads, check, record)


# Not asserted on the prose organism: on this claim's fixed 10-token random segments its
# induction heads score .32 (1.1; .19 on merged-BPE ids only) against .61-.62 on 23-token ones;
# it learned to copy spans of 12-23 tokens (fixtures/organisms/prose/FINDINGS.md).
@pytest.mark.claim(id="induction.exists", source=SOURCE,
                   subjects=[s for s in SUBJECTS if s != "prose"])
def test_some_head_does_induction(subject, record):
    """A mechanism claim, not a head index: runs on any checkpoint, any seed.

    Some head, in any layer after the first, puts at least 0.45 of its attention on a token a
    fixed offset (1-3) after the current token's earlier copy; a uniform head gets ~1/T. The
    heads it names (for ``--mutate``) are every head that clears the bar: breaking them all
    must make it fail, and renumbering heads must not move its value."""
    model = subject.model
    holds(model.cfg.n_layers, ">=", 2, "layers in the model",
          "induction needs a head after the first layer to read what an earlier one wrote",
          record, kind="sanity")
    # ids above the special tokens at the start of the vocabulary (an organism's <bos> <unk>);
    # GPT-2's one special token is its last id (50256), so its range starts at 0
    low = [i for i in model.tokenizer.all_special_ids if i < model.cfg.d_vocab // 2]
    vocab = (max(low, default=-1) + 1, min(model.cfg.d_vocab, 20000))
    n = min(10, (model.cfg.n_ctx - 1) // 2)
    bos = model.tokenizer.bos_token_id is not None
    tokens = repeated_random_tokens(n, batch=8, seed=0, vocab_range=vocab,
                                    bos=model.tokenizer.bos_token_id)
    found, clearing = [], set()
    for off in (1, 2, 3):
        later = offset_scores(model, tokens, "induction", off, bos=bos).values[1:]  # layers 1..
        value, flat = later.flatten().max(0)
        layer, head = divmod(int(flat), model.cfg.n_heads)
        found.append((float(value), f"{layer + 1}.{head}", off))
        clearing |= {f"{i + 1}.{h}" for i, h in (later >= 0.45).nonzero().tolist()}
    record.components(sorted(clearing) or [found[0][1]], breaks=("qk",), index_free=True,
                      together=True)
    value, head, off = max(found)
    holds(value, ">=", 0.45, f"best induction score beyond layer 0 (head {head}, offset {off})",
          "an induction head puts most of its attention on the token after the earlier copy",
          record)
