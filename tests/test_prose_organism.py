"""The natural-text induction organism's recipe (``mechtests.organisms.prose``): its pieces, and
a few steps of training plus the findings run end to end. No checkpoint is shipped yet: in the
recipe's first runs no induction head had formed (README, "Model organisms")."""

from __future__ import annotations

import pytest
import torch

from mechtests.organisms import prose as P

torch.set_num_threads(1)


def test_missing_corpus_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "CORPUS", tmp_path / "nope.dict.dz")
    with pytest.raises(P.CorpusMissing, match="apt-get install dict-gcide"):
        P.corpus_text(1000)


def test_repeat_windows_end_with_a_copy_of_their_own_prose():
    r = P.ProseRecipe()
    stream = torch.arange(10, 5000)  # distinct tokens: a copy can only come from the window
    g = torch.Generator().manual_seed(0)
    toks = P.window_batch(r, stream, g, 16, repeat=True)
    assert toks.shape == (16, r.n_positions) and (toks[:, 0] == 0).all()
    for row in toks[:, 1:]:
        n = next(n for n in range(r.repeat_len[1], r.repeat_len[0] - 1, -1)
                 if any(torch.equal(row[u:u + n], row[-n:]) for u in range(len(row) - 2 * n + 1)))
        assert r.repeat_len[0] <= n <= r.repeat_len[1]
    plain = P.window_batch(r, stream, g, 4, repeat=False)
    assert all(len(set(row[1:].tolist())) == r.n_positions - 1 for row in plain)


def test_model_is_attention_only_and_stays_so():
    r = P.ProseRecipe()
    m = P.make_model(r, 64)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    toks = torch.randint(1, 64, (2, 16))
    m(toks, labels=toks).loss.backward()
    opt.step()
    for block in m.transformer.h:
        assert all(not p.requires_grad and not p.any() for p in block.mlp.parameters())


needs_corpus = pytest.mark.skipif(not P.CORPUS.is_file(), reason=(
    f"the corpus is not installed: it ships in the Debian package {P.PACKAGE} "
    f"(apt-get install {P.PACKAGE})"))


@needs_corpus
def test_a_few_steps_train_save_load_and_analyse(tmp_path):
    """The recipe's whole path on a small slice of the corpus: training (attention-only, the
    history recorded), saving as an ordinary checkpoint, loading it as a user's, and the
    findings from the library's tools."""
    from mechtests.core.models import load_model

    r = P.ProseRecipe(steps=4, corpus_chars=200_000, eval_every=2, batch=4)
    model, tok, history = P.train(r, log=lambda s: None)
    assert [h["step"] for h in history] == [0, 2, 4]
    assert all(h["repeated_span"] > 0 for h in history)
    out = tmp_path / "prose"
    P.save(model, tok, r, history, out)
    loaded = load_model(str(out), device="cpu")
    assert loaded.cfg.n_layers == 2 and loaded.cfg.d_vocab == r.vocab_size
    text = P.write_findings(out)
    assert "Induction heads" in text and (out / "findings.json").is_file()
    f = __import__("json").loads((out / "findings.json").read_text())
    assert set(f["ablate_each_head"]) == {f"{la}.{h}" for la in range(2) for h in range(4)}
    assert P.render(f, {}).startswith("# Findings: prose")
