"""The IOI organism's recipe (``mechtests.organisms.ioi``): its tokenizer, name split and data,
a few steps of training plus the findings end to end; the shipped checkpoint
(``fixtures/organisms/ioi``) and the GPT-2 IOI claims on it, which must fail on a randomly
initialised copy and with its circuit's heads zeroed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mechtests.organisms import ioi as I
from mechtests.testing import broken_copy

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "fixtures" / "organisms" / "ioi"
pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def tok():
    return I.make_tokenizer(I.corpus_strings(I.all_names()))


def _strs(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def test_tokenizer_splits_the_language_and_the_gpt2_families_as_gpt2_does(tok):
    import random

    from mechtests import families as gpt2
    from mechtests.testing import gpt2_tokenizer

    g = gpt2_tokenizer()
    rng = random.Random(0)
    texts = [p.clean for o in ("ABBA", "BABA") for p in gpt2.gpt2_ioi(o).prompts]
    for i in range(300):
        d = I.ioi_sentence(rng, I.all_names(), ("ABBA", "BABA")[i % 2], prefix=i % 3 == 0)
        texts.append(d["prompt"] + " " + d["io"])
    assert all(_strs(tok, t) == _strs(g, t) for t in texts)
    assert len(tok) < 3000 and tok.bos_token_id == len(tok) - 1
    assert tok.convert_ids_to_tokens(tok.bos_token_id) == "<|endoftext|>"


def test_names_are_single_tokens_and_the_split_is_disjoint(tok):
    from mechtests.families import IOI_NAMES

    r = I.IOIRecipe()
    names = I.all_names()
    assert len(names) >= 400 and len(set(names)) == len(names)
    assert len(I.name_ids(tok, names)) == len(names)  # asserts one token each
    split = I.split_names(r)
    assert sorted(sum(split.values(), [])) == sorted(names)
    assert {n for p in IOI_NAMES for n in p} <= set(split["train"])
    assert len(split["held_out"]) >= 50 and len(split["unseen"]) >= 50


def test_batches_keep_held_out_names_out_of_ioi_and_unseen_names_out_of_everything(tok):
    r = I.IOIRecipe(prefix_share=0.5)
    split = I.split_names(r)
    held = set(I.name_ids(tok, split["held_out"]))
    unseen = set(I.name_ids(tok, split["unseen"]))
    bos = tok.bos_token_id
    every = set(I.name_ids(tok, I.all_names()))
    n_copy = held_in_copy = 0
    for step in range(5):
        tokens, weights = I.make_batch(r, step, tok, split)
        for row, w in zip(tokens.tolist(), weights):
            body = [t for t in row if t != bos]
            assert not unseen & set(body)
            assert abs(float(w.sum()) - 1.0) < 1e-6
            half = len(body) // 2
            if body[:half] == body[half:] and set(body) <= every:
                n_copy += 1
                held_in_copy += bool(held & set(body))
            else:
                assert not held & set(body), tok.decode(row)
                assert int(w.nonzero()[0]) == len(body) - 1  # scored: the answer only
    assert n_copy > 0 and held_in_copy > 0


def test_a_few_steps_train_save_load_and_analyse(tmp_path):
    """The recipe's whole path at a toy size: training (history recorded), saving as an
    ordinary checkpoint, loading it as a user's, and the findings from the library's tools."""
    from mechtests.core.models import load_model

    r = I.IOIRecipe(n_layer=2, n_head=2, n_embd=32, n_inner=64, steps=3, eval_every=2,
                    batch=8)
    model, tok, history = I.train(r, log=lambda s: None)
    assert [h["step"] for h in history] == [0, 2, 3]
    out = tmp_path / "ioi"
    I.save(model, tok, r, history, out)
    loaded = load_model(str(out), device="cpu")
    assert loaded.cfg.n_layers == 2 and loaded.cfg.d_vocab == len(tok)
    text = I.write_findings(out)
    f = json.loads((out / "findings.json").read_text())
    assert set(f["accuracy"]) == {"train", "held_out", "unseen"}
    assert set(f["orders"]) == {"ABBA", "BABA"} and text.startswith("# Findings: ioi")


def test_shipped_checkpoint_is_the_recipe_small_and_copies_held_out_names():
    from dataclasses import asdict

    info = json.loads((SHIPPED / "training.json").read_text())
    assert info["recipe"] == json.loads(json.dumps(asdict(I.IOIRecipe())))
    assert info["names"] == I.split_names(I.IOIRecipe())
    assert (SHIPPED / "model.safetensors").stat().st_size < 15_000_000
    cfg = json.loads((SHIPPED / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["model_type"] == "gpt2"
    acc = json.loads((SHIPPED / "findings.json").read_text())["accuracy"]
    assert acc["held_out"]["top1"] >= 0.9, acc  # the bar: held-out names, >= 0.9


@pytest.mark.heavy
def test_recipe_retrains_the_shipped_checkpoint(tmp_path):
    """The full recipe (minutes on one core) gives a model that meets the issue's bar on
    held-out names, as the shipped one does. Not byte for byte: 2000 steps amplify the last bits
    in which CPUs' float kernels differ (vector width, fused multiply-add). The shipped weights
    were reproduced exactly on the machines of earlier sessions; on an AMD EPYC with AVX512 they
    differ by up to 0.26, with held-out top-1 0.985 against the shipped 1.0. Determinism on one
    machine is asked of a short run instead (``test_recipe_is_deterministic_on_one_machine``)."""
    r = I.IOIRecipe()
    model, tok, history = I.train(r, log=lambda s: None)
    shipped = json.loads((SHIPPED / "training.json").read_text())["history"][-1]
    assert history[-1]["step"] == shipped["step"]
    assert history[-1]["held_out"]["top1"] >= 0.9, history[-1]  # the bar
    assert history[-1]["unseen"]["top1"] <= 0.1, history[-1]  # unseen names stay unknown
    I.save(model, tok, r, history, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size == \
        (SHIPPED / "model.safetensors").stat().st_size


@pytest.mark.heavy
def test_recipe_is_deterministic_on_one_machine(tmp_path):
    """Forty steps of the recipe, twice in one process, give the same bytes: nothing in the
    training samples outside its seeds."""
    from dataclasses import replace

    r = replace(I.IOIRecipe(), steps=40, eval_every=40)
    saved = []
    for k in range(2):
        model, tok, history = I.train(r, log=lambda s: None)
        I.save(model, tok, r, history, tmp_path / str(k))
        saved.append((tmp_path / str(k) / "model.safetensors").read_bytes())
    assert saved[0] == saved[1]


def _claims(pytester, model, *args):
    res = pytester.runpytest(str(ROOT / "claims" / "test_ioi.py"), "--model", str(model),
                             "--no-report", "-p", "no:cacheprovider", "-q", "-rxX", *args)
    return res, {k: v for k, v in res.parseoutcomes().items()
                 if k in ("passed", "failed", "error", "errors", "inconclusive", "xfailed",
                          "xpassed")}


def _copy(tmp_path, zero_heads=(), random_init=False):
    return broken_copy(SHIPPED, tmp_path / "ioi", zero_heads, random_init)


def test_ioi_claims_on_the_shipped_organism(pytester):
    """Behaviour, name movers and knockout hold in both orders; the attention claim fails, as
    the analysis found (strict xfail)."""
    res, got = _claims(pytester, SHIPPED)
    assert got == {"passed": 6, "xfailed": 2}, res.stdout.str()[-3000:]


def test_ioi_claims_fail_on_a_randomly_initialised_copy(pytester, tmp_path):
    res, got = _claims(pytester, _copy(tmp_path, random_init=True), "-k", "not attend")
    assert got.get("failed", 0) >= 2 and not got.get("passed") and not got.get("error"), got


@pytest.mark.parametrize("heads", [("1.0",), ("1.0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6",
                                              "1.7")])
def test_ioi_mechanism_claims_fail_with_name_movers_zeroed(pytester, tmp_path, heads):
    """One mover gone: the role has a vacancy; all of them: the model no longer does IOI, so
    the mechanism claims cannot hold (failed or inconclusive)."""
    res, got = _claims(pytester, _copy(tmp_path, zero_heads=heads), "-k",
                       "name_movers_have or knocking")
    out = res.stdout.str()
    assert not got.get("passed") and not got.get("error"), out[-3000:]
    assert got.get("failed", 0) + got.get("inconclusive", 0) == 4, got


@pytest.mark.heavy
def test_mutation_run_calls_the_ioi_claims_on_the_organism_discriminating(pytester):
    pytester.runpytest(str(ROOT / "claims" / "test_ioi.py"), "--model", "ioi",
                       "--mutate", "--report-dir", "out", "-p", "no:cacheprovider", "-q")
    data = json.loads(next(pytester.path.glob("out/run-*/report.json")).read_text())
    verdicts = {c: m["verdict"] for c, m in data["mutation"].items()}
    # the attention claim does not hold on the organism (a strict xfail): no mutants for it
    assert verdicts.pop("ioi.name_mover_attention").startswith("not run"), verdicts
    assert verdicts == {c: "discriminating" for c in (
        "ioi.logit_diff", "ioi.name_movers", "ioi.knockout")}, verdicts
