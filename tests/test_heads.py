"""Head-detector scores, attention between positions and patterns, against TransformerLens."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import head_detector as hd

from mechtests.analysis import heads as Hd


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def rep(model):
    return Hd.repeated_random_tokens(6, batch=3, seed=1, vocab_range=(2, model.cfg.d_vocab),
                                     bos=0)


def test_repeated_random_tokens_are_seeded_repeats():
    a = Hd.repeated_random_tokens(5, batch=4, seed=3, vocab_range=(10, 30), bos=1)
    assert a.shape == (4, 11) and (a[:, 0] == 1).all()
    assert torch.equal(a[:, 1:6], a[:, 6:])
    assert ((a[:, 1:] >= 10) & (a[:, 1:] < 30)).all()
    assert all(len(set(row[1:6].tolist())) == 5 for row in a)     # no repeats inside a half
    assert torch.equal(a, Hd.repeated_random_tokens(5, batch=4, seed=3, vocab_range=(10, 30),
                                                    bos=1))
    assert not torch.equal(a, Hd.repeated_random_tokens(5, 4, 4, (10, 30), bos=1))
    big = Hd.repeated_random_tokens(8, batch=2, seed=0, vocab_range=(0, 3))   # with repeats
    assert big.shape == (2, 16) and big.max() < 3
    with pytest.raises(ValueError, match=r"needs vocab_range=\(lo, hi\)"):
        Hd.repeated_random_tokens(4)
    with pytest.raises(ValueError, match="non-empty vocab_range"):
        Hd.repeated_random_tokens(4, vocab_range=(5, 5))


def test_detection_patterns_equal_tl():
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 4, (3, 10), generator=g)                      # many duplicates
    for kind in Hd.KINDS:
        ours = Hd.detection_pattern(toks, kind)
        fn = getattr(hd, f"get_{kind}_head_detection_pattern")
        for i in range(3):
            assert torch.equal(ours[i], fn(toks[i:i + 1]))
    with pytest.raises(ValueError, match="unknown head kind 'name_mover'"):
        Hd.detection_pattern(toks, "name_mover")


@pytest.mark.parametrize("kind", Hd.KINDS)
def test_head_scores_equal_tl_head_detector(model, rep, kind):
    vocab = model.tokenizer.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))
    texts = [" ".join(vocab[i] for i in row[1:].tolist()) for row in rep]   # TL adds the BOS
    assert torch.equal(model.to_tokens(texts[0])[0].cpu(), rep[0])
    for exclude_bos in (False, True):
        for exclude_current in (False, True):
            ours = Hd.head_scores(model, rep, kind, exclude_bos=exclude_bos,
                                  exclude_current_token=exclude_current)
            tl = hd.detect_head(model, texts, f"{kind}_head", exclude_bos=exclude_bos,
                                exclude_current_token=exclude_current)
            assert ours.axes == ("layer", "head") and ours.per_prompt.shape == (3, 2, 4)
            assert (ours.values - tl).abs().max() < 1e-5


def test_target_row_scores_are_stripe_means(model, rep):
    with torch.no_grad():
        _, cache = model.run_with_cache(rep)
    pat = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(2)], 1)
    n = 6                                   # BOS + 2 halves of 6: query q >= 7 reads q - n + 1
    stripe = pat.diagonal(offset=-(n - 1), dim1=-2, dim2=-1)[..., 2:]      # queries 7..12
    ind = Hd.head_scores(model, rep, "induction", over="targets")
    assert (ind.per_prompt - stripe.mean(-1)).abs().max() < 1e-5
    prev = Hd.head_scores(model, rep, "previous_token", over="targets")
    assert (prev.per_prompt - pat.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)).abs().max() \
        < 1e-5
    tl_style = Hd.head_scores(model, rep, "induction")          # TL divides by all 13 rows
    assert (tl_style.per_prompt - stripe.sum(-1) / 13).abs().max() < 1e-5
    with pytest.raises(ValueError, match="over='rows'"):
        Hd.head_scores(model, rep, "induction", over="rows")
    with pytest.raises(ValueError, match="no query position has a target for 'induction'"):
        Hd.head_scores(model, torch.arange(2, 9)[None], "induction", over="targets")


def test_induction_scores_equal_tl_detector_on_their_tokens(model):
    """The default tokens skip <bos> and <unk> (ids 0, 1); the score is TL's detector on them."""
    r = Hd.induction_scores(model, n_tokens=5, batch=2, seed=0)
    toks = Hd.repeated_random_tokens(5, 2, 0, (2, model.cfg.d_vocab), bos=0)
    vocab = model.tokenizer.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))
    texts = [" ".join(vocab[i] for i in row[1:].tolist()) for row in toks]   # TL adds the BOS
    assert torch.equal(model.to_tokens(texts).cpu(), toks)
    tl = hd.detect_head(model, texts, "induction_head")
    assert r.axes == ("layer", "head") and (r.values - tl).abs().max() < 1e-5


def test_attention_between_and_pattern(model, rep):
    with torch.no_grad():
        _, cache = model.run_with_cache(rep)
    q, k = torch.tensor([12, 7, 9]), torch.tensor([2, 7, 0])
    r = Hd.attention_between(model, rep, q, k)
    assert r.axes == ("layer", "head")
    for layer in range(2):
        expect = cache[f"blocks.{layer}.attn.hook_pattern"][torch.arange(3), :, q, k]
        assert (r.per_prompt[:, layer] - expect).abs().max() < 1e-5
    p = Hd.attention_pattern(model, rep, 1, 2, prompt=1)
    assert p.axes == ("dest", "src") and p.labels["dest"][0] == "0 <bos>"
    assert (p.values - cache["blocks.1.attn.hook_pattern"][1, 2]).abs().max() < 1e-5
    assert torch.allclose(p.values.sum(-1), torch.ones(13), atol=1e-5)
    with pytest.raises(ValueError, match="to_pos 9 comes after from_pos 8 in prompt 0"):
        Hd.attention_between(model, rep, 8, 9)
    with pytest.raises(ValueError, match="from_pos: position 13 of prompt 0 is beyond"):
        Hd.attention_between(model, rep, 13, 0)
    with pytest.raises(ValueError, match="unknown head 4: each layer has heads 0..3"):
        Hd.attention_pattern(model, rep, 0, 4)
    with pytest.raises(ValueError, match="unknown layer -3: the model has layers 0..1"):
        Hd.attention_pattern(model, rep, -3, 0)
