"""Prompt families: templates, named positions, and validation errors that show token splits."""

from __future__ import annotations

import pytest

from mechtests.core.prompts import Prompt, PromptError, PromptFamily, position

IOI = "When {IO} and {S1} went to the {PLACE} , {S2} gave a {OBJ} to"
FILLS = [
    {"IO": "Mary", "S1": "John", "S2": "John", "PLACE": "store", "OBJ": "drink"},
    {"IO": "Tom", "S1": "James", "S2": "James", "PLACE": "park", "OBJ": "ball"},
]


def swap_s2(f):
    return {**f, "S2": f["IO"]}


def ioi() -> PromptFamily:
    return PromptFamily.from_template("ioi", IOI, FILLS, swap_s2, " {IO}", " {S1}")


def test_template_family_tokenizes_with_positions(tiny_model):
    tf = ioi().tokenize(tiny_model)
    assert tf.clean.shape == tf.corrupted.shape == (2, 15)  # BOS + 14 words
    tok = tiny_model.tokenizer
    assert tok.decode(tf.clean[0, tf.positions["IO"][0]]) == "Mary"
    assert tok.decode(tf.clean[0, tf.positions["S2"][0]]) == "John"
    assert tok.decode(tf.corrupted[0, tf.positions["S2"][0]]) == "Mary"
    assert tf.positions["END"].tolist() == [14, 14]
    assert tok.decode(tf.answer_ids[1]) == "Tom" and tok.decode(tf.counterfactual_ids[1]) == "James"
    assert tf.pos_labels[1] == "1 When"


def test_no_bos(tiny_model):
    fam = PromptFamily.from_template("ioi", IOI, FILLS, swap_s2, " {IO}", " {S1}",
                                     prepend_bos=False)
    tf = fam.tokenize(tiny_model)
    assert tf.clean.shape[1] == 14 and tf.positions["IO"][0] == 1


def test_mismatched_lengths_show_splits(tiny_model):
    fam = PromptFamily("bad", [Prompt("Mary gave a drink to", "Mary gave a drink to John",
                                      " John", " Mary")])
    with pytest.raises(PromptError, match=r"different token counts \(6 vs 7\)(.|\n)*"
                                          r"corrupted: '<bos>' \| 'Mary'"):
        fam.tokenize(tiny_model)


def test_prompts_of_different_lengths_in_one_family(tiny_model):
    fam = PromptFamily("mixed", [Prompt("Mary gave a drink to", "John gave a drink to",
                                        " John", " Mary"),
                                 Prompt("Mary gave a drink to the", "John gave a drink to the",
                                        " John", " Mary")])
    with pytest.raises(PromptError, match=r"prompt 1 has 7 tokens but prompt 0 has 6"):
        fam.tokenize(tiny_model)


def test_multi_token_answer_shows_split(tiny_model):
    fam = PromptFamily("bad", [Prompt("Mary gave a drink to", "John gave a drink to",
                                      " John Smith", " Mary")])
    with pytest.raises(PromptError, match=r"answer ' John Smith' is not one token, it splits "
                                          r"into 2: 'John' \| 'Smith'"):
        fam.tokenize(tiny_model)


def test_empty_family():
    with pytest.raises(PromptError, match=r"family 'none' is empty"):
        PromptFamily("none", [])


def test_unknown_slot():
    with pytest.raises(PromptError, match=r"uses slot 'IO'"):
        PromptFamily.from_template("x", IOI, [{"S1": "John"}], dict, " {IO}", " {S1}")


def test_unknown_named_position(tiny_model):
    with pytest.raises(PromptError, match=r"no position 'S3'; it has END, IO, OBJ, PLACE, S1, S2"):
        position(ioi().tokenize(tiny_model), "S3")


def test_no_bos_token(tiny_model):
    class NoBos:
        bos_token_id = None

    with pytest.raises(PromptError, match=r"prepend_bos=False"):
        ioi().tokenize(NoBos())


# -- silent wrong inputs (issue 10) ------------------------------------------------------------
@pytest.mark.parametrize(("clean", "answer", "unknown"), [
    ("Mary gave a sandwich to", " John", "'sandwich'"),       # an unknown word
    ("Mary gave a drink 🍹 to", " John", "'🍹'"),              # an emoji
    ("Mary gave a drink to", " Zed", "'Zed'"),                # an unknown answer
])
def test_words_the_tokenizer_does_not_know_are_named_not_turned_into_unk(tiny_model, clean,
                                                                         answer, unknown):
    corrupted = clean.replace("Mary", "John")
    fam = PromptFamily("unk", [Prompt(clean, corrupted, answer, " Mary")])
    with pytest.raises(PromptError, match=rf"prompt 0: the (clean prompt|answer) .* has words the "
                                          rf"tokenizer does not know \({unknown}\): they become "
                                          rf"'<unk>'"):
        fam.tokenize(tiny_model)


def test_unk_check_does_not_fire_on_known_words_or_a_literal_unk(tiny_model):
    fam = PromptFamily("ok", [Prompt("Mary gave <unk> to", "John gave <unk> to", " John",
                                     " Mary")])
    assert fam.tokenize(tiny_model).clean.shape == (1, 5)


def test_answer_equal_to_counterfactual_is_refused(tiny_model):
    fam = PromptFamily.from_template("same", IOI, FILLS, swap_s2, " {IO}", " {IO}")
    with pytest.raises(PromptError, match=r"prompt 0: the answer ' Mary' and the counterfactual "
                                          r"' Mary' are the same token .* is 0 in every run"):
        fam.tokenize(tiny_model)


def test_fit_gives_a_bos_only_where_the_checkpoint_s_tokenizer_prepends_one(tmp_path):
    """A family written without BOS (GPT-2's recall prompts) gets one on a model whose own
    tokenizer puts its BOS before every text (Gemma's), read from the checkpoint: the loaded
    bridge's tokenizer prepends one for every model, so it cannot say."""
    from tokenizers import processors

    from mechtests.core.models import load_model
    from mechtests.core.prompts import adds_bos, fit
    from mechtests.testing import save_tiny_llama

    fam = PromptFamily.from_template("ioi", IOI, FILLS, swap_s2, " {IO}", " {S1}",
                                     prepend_bos=False)
    plain = save_tiny_llama(tmp_path / "plain")
    with_bos = save_tiny_llama(tmp_path / "bos")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(with_bos)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    tok.save_pretrained(with_bos)
    lengths = {}
    for name, path in (("plain", plain), ("bos", with_bos)):
        model = load_model(str(path), device="cpu")
        assert model.tokenizer("a").input_ids[0] == model.tokenizer.bos_token_id  # the bridge's
        lengths[name] = (adds_bos(model), fit(fam, model)[0].clean.shape[1])
    assert lengths == {"plain": (False, 14), "bos": (True, 15)}
