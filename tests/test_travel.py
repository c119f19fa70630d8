"""Claims that travel: a family rebuilt for another tokenizer, split in two disjoint seeded
halves, roles cast anew on one and confirmed on the other, against a control of as many other
heads (``prompts.fit``, ``TokenizedFamily.split``, ``roles.cast`` with no expected heads,
``roles.verdict``)."""

from __future__ import annotations

import pytest

from mechtests import families as F
from mechtests.core.prompts import PromptError, PromptFamily, fit
from mechtests.suite.roles import Role, RoleVacant, cast, others, verdict
from mechtests.testing import gpt2_tokenizer as load_gpt2_tokenizer
from tests.test_roles import FakeRecord


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


SUBJECT = type("S", (), {"name": "real-model", "mutant": ""})()
ROLE = Role("movers", "up to two heads beyond layer 0 with the highest score, each >= 0.5")
SCORES = {f"{layer}.{h}": 0.0 for layer in range(4) for h in range(4)}
SCORES.update({"0.0": 9.0, "1.0": 0.9, "2.1": 0.7, "3.3": 0.2})


def test_fit_keeps_what_the_tokenizer_expresses_and_says_why_the_rest_went(gpt2_tokenizer):
    fam = PromptFamily.from_template(
        "t", "When {IO} and {S} went out, {S} gave it to",
        [{"IO": "Mary", "S": "John"}, {"IO": "Mary", "S": "Xzqwyv"}, {"IO": "Anna", "S": "Tom"}],
        lambda f: {**f, "S": f["IO"]}, " {IO}", " {S}")
    tf, dropped = fit(fam, gpt2_tokenizer)
    assert tf.n_prompts == 2 and [p.answer for p in tf.family.prompts] == [" Mary", " Anna"]
    assert len(dropped) == 1 and "Xzqwyv" in dropped[0]


def test_fit_refuses_a_family_no_prompt_of_which_fits(gpt2_tokenizer):
    fam = PromptFamily.from_template("t", "{A} went", [{"A": "Xzqwyv"}], lambda f: f, " {A}",
                                     " x")
    with pytest.raises(PromptError, match="no prompt can be expressed"):
        fit(fam, gpt2_tokenizer)


def test_the_halves_are_disjoint_cover_the_family_and_are_seeded(gpt2_tokenizer):
    tf, _ = fit(F.any_ioi("ABBA"), gpt2_tokenizer)
    a, b = tf.split(0)
    assert not set(a) & set(b) and sorted(a + b) == list(range(tf.n_prompts))
    assert abs(len(a) - len(b)) <= 1
    assert tf.split(0) == (a, b) and tf.split(1) != (a, b)
    half = tf.subset(b)
    assert half.n_prompts == len(b)
    assert half.clean.tolist() == [tf.clean[i].tolist() for i in b]
    assert half.positions["IO"].tolist() == [int(tf.positions["IO"][i]) for i in b]


def test_a_role_cast_anew_is_checked_on_who_plays_it_and_the_control_must_fail():
    rec = FakeRecord()
    c = cast(SUBJECT, None, ROLE, (), SCORES, rec, n=2, need=1, floor=0.5,
             eligible=lambda h: h.layer > 0)
    assert c.found == ("1.0", "2.1") and c.anew and not c.vacant and not c.reference
    seen = []

    def check(heads):  # a check about the named heads: their score clears 0.5
        seen.append(tuple(heads))
        assert all(SCORES[h] >= 0.5 for h in heads), heads

    verdict(c, check, rec)
    assert seen[0] == ("1.0", "2.1")
    control = seen[1]
    assert control == others(c) and len(control) == 2 and not set(control) & {"1.0", "2.1"}
    (question, outcome, _), = rec.besides
    assert (question, outcome) == ("control", "failed")


def test_a_claim_fails_when_its_check_holds_on_other_heads_as_well():
    """The claim with its found heads replaced by as many others must fail: when it does not,
    the check says nothing about who plays the role, and the verdict says so."""
    rec = FakeRecord()
    c = cast(SUBJECT, None, ROLE, (), SCORES, rec, n=2, need=1, floor=0.5)
    with pytest.raises(AssertionError, match="does not single out the components"):
        verdict(c, lambda heads: None, rec)
    assert rec.besides[-1][:2] == ("control", "held")


def test_the_control_draws_from_every_head_not_only_the_eligible_ones():
    c = cast(SUBJECT, None, ROLE, (), SCORES, FakeRecord(), n=2, floor=0.5,
             eligible=lambda h: h.layer > 0)
    assert len(c.pool) == len(SCORES)
    drawn = {h for seed in range(30) for h in others(c, seed)}
    assert any(h.startswith("0.") for h in drawn)  # layer 0 was not eligible, still drawn


def test_a_role_no_head_plays_is_vacant_and_fails():
    rec = FakeRecord()
    c = cast(SUBJECT, None, ROLE, (), SCORES, rec, n=2, need=1, floor=5.0,
             eligible=lambda h: h.layer > 0)
    assert c.found == () and c.vacant == ("#1",)
    with pytest.raises(RoleVacant, match="no component plays the role 'movers'"):
        verdict(c, lambda heads: None, rec)


def test_strict_components_cannot_be_asked_of_a_model_with_no_reference_of_its_shape():
    rec = FakeRecord(strict=True)
    c = cast(SUBJECT, None, ROLE, (), SCORES, rec, n=2, floor=0.5)
    with pytest.raises(pytest.skip.Exception, match="no reference of its shape"):
        verdict(c, lambda heads: None, rec)
