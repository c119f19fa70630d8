"""GPT-2 families reproduce the published prompt sets (as text: GPT-2's tokenizer is not here)."""

from __future__ import annotations

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
    c = F.gpt2_contraction()
    assert len(c) == 28
    assert c.prompts[0].clean == "We're helping our friend while they"
    assert c.prompts[0].corrupted == "We are helping our friend while they"
    assert (c.prompts[0].answer, c.prompts[0].counterfactual) == ("'re", " are")
    he = [p for p in c.prompts if p.clean.endswith(" he")][0]
    assert (he.answer, he.counterfactual) == ("'s", " is")
    g = F.gpt2_gender()
    assert g.prompts[0].clean == "The king said that"
    assert g.prompts[0].corrupted == "The queen said that"
