"""The natural-text induction organism's recipe (``mechtests.organisms.prose``): its pieces, and
a few steps of training plus the findings run end to end; the shipped checkpoint
(``fixtures/organisms/prose``) and the GPT-2 induction claims on it, which must fail on a
randomly initialised copy and with its circuit's heads zeroed."""

from __future__ import annotations

import pytest
import torch

from mechtests.organisms import prose as P
from mechtests.testing import broken_copy

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


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "fixtures" / "organisms" / "prose"
pytest_plugins = ["pytester"]


def test_shipped_checkpoint_is_the_recipe_and_small():
    import json
    from dataclasses import asdict

    info = json.loads((SHIPPED / "training.json").read_text())
    assert info["recipe"] == json.loads(json.dumps(asdict(P.ProseRecipe())))
    assert (SHIPPED / "model.safetensors").stat().st_size < 2_000_000
    last = info["history"][-1]
    # the repeated span is far cheaper than the same tokens' first occurrence once it formed
    assert last["repeated_span"] < 0.5 * last["first_occurrence"]


def _claims(pytester, model, *args):
    res = pytester.runpytest(str(ROOT / "claims" / "test_induction.py"), "--model", str(model),
                             "--no-report", "-p", "no:cacheprovider", "-q",
                             "-k", "not some_head", *args)
    return res, {k: v for k, v in res.parseoutcomes().items()
                 if k in ("passed", "failed", "error", "errors", "inconclusive")}


def _copy(tmp_path, zero_heads=(), random_init=False):
    return broken_copy(SHIPPED, tmp_path / "prose", zero_heads, random_init)


def test_induction_claims_hold_on_the_shipped_organism(pytester):
    res, got = _claims(pytester, SHIPPED)
    assert got == {"passed": 3}, res.stdout.str()[-3000:]


def test_induction_claims_fail_on_a_randomly_initialised_copy(pytester, tmp_path):
    res, got = _claims(pytester, _copy(tmp_path, random_init=True))
    assert got.get("failed", 0) >= 2 and not got.get("passed") and not got.get("error"), got


@pytest.mark.parametrize("heads,fails", [
    # the previous-token head's output gone: the induction heads lose what they key on
    (("0.0",), "attend_to_the_token_after"),
    # the induction heads' outputs gone: the repeated half is no cheaper than the first
    (("1.3", "1.1"), "knocking_out"),
])
def test_induction_claims_fail_with_the_circuit_heads_zeroed(pytester, tmp_path, heads, fails):
    res, got = _claims(pytester, _copy(tmp_path, zero_heads=heads))
    out = res.stdout.str()
    assert got.get("failed", 0) + got.get("inconclusive", 0) >= 1, out[-3000:]
    assert f"{fails}" in out and "PASSED" not in " ".join(
        line for line in out.splitlines() if fails in line and "PASSED" in line), out[-3000:]
    assert not got.get("error"), got


def test_mutation_run_calls_the_induction_claims_on_prose_discriminating(pytester):
    import json

    pytester.runpytest(str(ROOT / "claims" / "test_induction.py"), "--model", "prose",
                       "-k", "not some_head", "--mutate", "--report-dir", "out",
                       "-p", "no:cacheprovider", "-q")
    data = json.loads(next(pytester.path.glob("out/run-*/report.json")).read_text())
    verdicts = {c: m["verdict"] for c, m in data["mutation"].items()}
    assert verdicts == {c: "discriminating" for c in (
        "induction.heads", "induction.previous_token", "induction.ablation")}, verdicts
