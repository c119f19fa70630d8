"""GPT-2 families reproduce the published prompt sets: as text, and as GPT-2's own tokenizer
(fixtures/gpt2-tokenizer) splits them."""

from __future__ import annotations

import pytest

from mechtests import families as F


def test_ioi_ea_is_the_published_set():
    fam = F.gpt2_ioi_ea()
    assert len(fam) == 8
    p = fam.prompts
    assert p[0].clean == "When John and Mary went to the shops, John gave the bag to"
    assert (p[0].answer, p[0].counterfactual) == (" Mary", " John")
    # the corrupted set swaps each adjacent pair of prompts
    for i in range(0, 8, 2):
        assert p[i].corrupted == p[i + 1].clean and p[i + 1].corrupted == p[i].clean
    assert p[7].clean == "After Martin and Amy went to the park, Martin gave a drink to"
    assert p[0].clean[p[0].marks["IO"]:].startswith("Mary")
    assert p[0].clean[p[0].marks["S2"]:].startswith("John gave")


def test_ioi_orders():
    abba, baba = F.gpt2_ioi("ABBA"), F.gpt2_ioi("BABA")
    assert len(abba) == len(baba) == 32
    a = abba.prompts[0]
    assert a.clean.startswith("When Mary and John") and a.answer == " Mary"
    b = baba.prompts[0]
    assert b.clean.startswith("When John and Mary") and b.answer == " Mary"


def test_recall_and_contraction_and_gender():
    m = F.gpt2_name_recall_michelle()
    assert m.prompts[0].clean == "Michelle Jones was a top-notch student. Michelle"
    assert m.prompts[0].corrupted == "Michelle Smith was a top-notch student. Michelle"
    assert not m.prepend_bos
    r = F.gpt2_name_recall()
    assert len(r) == 12 and r.prompts[0].clean == m.prompts[0].clean
    c = F.gpt2_contraction()
    assert len(c) == 14 and len({p.clean.split()[0] for p in c.prompts}) == 4
    assert c.prompts[0].clean == "We're helping our friend while they"
    assert c.prompts[0].corrupted == "We are helping our friend while they"
    assert (c.prompts[0].answer, c.prompts[0].counterfactual) == ("'re", " are")
    he = [p for p in c.prompts if p.clean.endswith(" he")][0]
    assert (he.answer, he.counterfactual) == ("'s", " is")
    g = F.gpt2_gender()
    assert g.prompts[0].clean == "The king said that"
    assert g.prompts[0].corrupted == "The queen said that"


# --- every GPT-2 family against GPT-2's real tokenizer (fixtures/gpt2-tokenizer) -------------

# (task, kind) -> (tokens per prompt, BOS, {named position: index}, the position where clean and
# corrupted differ). Published: the IOI prompts are 15 tokens with BOS, S2 at 10 and the last
# position at 14 (EA; resid_pre patching "at the S2 position (index 10)"); the Michelle prompt
# is 11 tokens without BOS, " Jones" at 1 (shared/published-values.md).
GPT2_SHAPES = {
    ("ioi", "ABBA"): (15, True, {"IO": 2, "S1": 4, "S2": 10, "END": 14}, "S2"),
    ("ioi", "BABA"): (15, True, {"S1": 2, "IO": 4, "S2": 10, "END": 14}, "S2"),
    ("recall", "michelle"): (11, False, {"FIRST": 0, "SURNAME": 1, "Q": 10, "END": 10},
                             "SURNAME"),
    ("recall", "names"): (11, False, {"FIRST": 0, "SURNAME": 1, "Q": 10, "END": 10}, "SURNAME"),
    ("contraction", "contracted"): (8, True, {"P1": 1, "V1": 2, "P2": 7, "END": 7}, "V1"),
    ("gender", "nouns"): (5, True, {"NOUN": 2, "END": 4}, "NOUN"),
}


@pytest.fixture(scope="module")
def gpt2_tok():
    from mechtests.testing import gpt2_tokenizer

    return gpt2_tokenizer()


def test_every_gpt2_claim_family_is_validated_here():
    from claims.families import FAMILIES

    written = {(task, kind) for task, refs in FAMILIES.items() for kind in refs.get("gpt2", {})}
    assert written == set(GPT2_SHAPES)


@pytest.mark.parametrize("task,kind", list(GPT2_SHAPES), ids=[f"{t}-{k}" for t, k in GPT2_SHAPES])
def test_gpt2_family_tokenizes_as_published(gpt2_tok, task, kind):
    from claims.families import FAMILIES

    n_tokens, bos, named, differs = GPT2_SHAPES[(task, kind)]
    fam = FAMILIES[task]["gpt2"][kind]()
    tf = fam.tokenize(gpt2_tok)  # raises PromptError, showing the splits, on any misfit
    assert fam.prepend_bos == bos
    assert tf.clean.shape == tf.corrupted.shape == (len(fam), n_tokens)
    assert bool((tf.clean[:, 0] == gpt2_tok.bos_token_id).all()) == bos
    assert set(tf.positions) == set(named)
    for name, at in named.items():
        assert tf.positions[name].tolist() == [at] * len(fam), name
    # clean and corrupted differ at exactly the corrupted slot's token
    diff = (tf.clean != tf.corrupted).nonzero()[:, 1]
    assert diff.tolist() == [named[differs]] * len(fam)
    # the named position holds the slot's word, answers are the intended single tokens
    for i, p in enumerate(fam.prompts):
        for name, offset in p.marks.items():
            token = gpt2_tok.decode([int(tf.clean[i, tf.positions[name][i]])]).strip()
            assert token and p.clean[offset:].startswith(token), (name, token, p.clean)
        assert gpt2_tok.decode([int(tf.answer_ids[i])]) == p.answer
        assert gpt2_tok.decode([int(tf.counterfactual_ids[i])]) == p.counterfactual
        assert p.answer != p.counterfactual


def test_ioi_demo_set_tokenizes_as_published(gpt2_tok):
    fam = F.gpt2_ioi_ea()
    tf = fam.tokenize(gpt2_tok)
    assert tf.clean.shape == (8, 15) and bool((tf.clean[:, 0] == 50256).all())
    assert tf.positions["S2"].tolist() == [10] * 8 and tf.positions["END"].tolist() == [14] * 8
    # the published corrupted set swaps each adjacent pair of prompts
    assert (tf.corrupted[0::2] == tf.clean[1::2]).all()
    assert (tf.corrupted[1::2] == tf.clean[0::2]).all()


def test_michelle_family_has_the_published_ids(gpt2_tok):
    tf = F.gpt2_name_recall_michelle().tokenize(gpt2_tok)
    assert tf.clean[0, 1] == 5437 and tf.clean[0, 2] == 373
    assert tf.answer_ids.tolist() == [5437]  # " Jones"
