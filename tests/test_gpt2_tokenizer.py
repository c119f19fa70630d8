"""The vendored GPT-2 BPE files are GPT-2's, and the tokenizer built from them splits as GPT-2's
does (the published figures of shared/published-values.md)."""

from __future__ import annotations

import hashlib
import json

import pytest

from mechtests.testing import GPT2_TOKENIZER_DIR, GPT2_TOKENIZER_SHA256, gpt2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", sorted(GPT2_TOKENIZER_SHA256))
def test_vendored_files_are_the_ones_in_the_provenance_note(name):
    data = (GPT2_TOKENIZER_DIR / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == GPT2_TOKENIZER_SHA256[name]
    assert GPT2_TOKENIZER_SHA256[name] in (GPT2_TOKENIZER_DIR / "README.md").read_text()


def test_vocabulary_and_merges_have_gpt2s_sizes(tok):
    enc = json.loads((GPT2_TOKENIZER_DIR / "encoder.json").read_text())
    merges = (GPT2_TOKENIZER_DIR / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert len(enc) == 50257 and sorted(enc.values()) == list(range(50257))
    assert merges[0].startswith("#version") and len(merges) - 1 == 50000
    assert len(tok) == 50257
    assert tok.bos_token_id == tok.eos_token_id == enc["<|endoftext|>"] == 50256


def test_michelle_prompt_is_eleven_tokens_with_the_published_ids(tok):
    got = ids(tok, "Michelle Jones was a top-notch student. Michelle")
    assert len(got) == 11
    assert got[1] == 5437 and tok.decode([got[1]]) == " Jones"
    assert got[2] == 373 and tok.decode([got[2]]) == " was"


def test_ioi_demo_prompt_is_fifteen_tokens_with_bos(tok):
    text = "When John and Mary went to the shops, John gave the bag to"
    got = [tok.bos_token_id] + ids(tok, text)
    assert len(got) == 15
    assert [tok.decode([i]) for i in got[9:12]] == [",", " John", " gave"]


def test_byte_level_round_trip_and_no_unknowns(tok):
    text = "naïve café — 'quotes' \t tabs\n and ünïcödé 1234"
    assert tok.decode(ids(tok, text)) == text
    assert tok.unk_token_id not in ids(tok, text)

