"""Model organisms: shipped checkpoints load and still do what FINDINGS.md says; a quick retrain
finds the mechanism again; sabotaged copies make the analysis report it missing; bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import astuple
from pathlib import Path

import pytest
import torch

from mechtests.core.models import CheckpointError, load_model
from mechtests.core.sites import Head
from mechtests.organisms import analysis as A
from mechtests.organisms import findings, fixture_dir
from mechtests.organisms import language as lang
from mechtests.organisms.train import RecipeError, run

ACC_MARGIN = 0.05  # a reloaded organism may score this much below its recorded accuracy
KL_MARGIN = 0.01  # nats above the recorded bigram KL

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def organism():
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(name, device="cpu")
        return cache[name]

    return get


def _copy_with(tmp_path: Path, name: str, edit) -> Path:
    """A copy of a shipped organism with its weights edited by ``edit(state_dict)``."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / f"{name}-sabotaged"
    shutil.copytree(fixture_dir(name), out)
    sd = load_file(out / "model.safetensors")
    edit(sd)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _zero_heads(sd: dict, heads: list[str], n_heads: int) -> None:
    """Zero the output weights (attn.c_proj rows) of heads ``"L.H"`` in a GPT-2 state dict."""
    for head in heads:
        layer, h = astuple(Head.parse(head))
        w = sd[f"transformer.h.{layer}.attn.c_proj.weight"]  # Conv1D: [d_model in, d_model out]
        d_head = w.shape[0] // n_heads
        w[h * d_head:(h + 1) * d_head] = 0.0


# --- shipped checkpoints -----------------------------------------------------------------------


def test_bigram_recovers_table(organism):
    m, rec = organism("bigram"), findings("bigram")
    assert m.cfg.n_layers == 0
    fit = A.bigram_fit(m)
    assert fit["kl"] <= rec["fit"]["kl"] + KL_MARGIN
    assert fit["logit_corr"] >= rec["fit"]["logit_corr"] - 0.02
    emb = A.bigram_embedding_classes(m)
    assert emb["centroid_acc_2d"] >= rec["embedding_classes"]["centroid_acc_2d"] - 0.05


def test_induction_organism_mechanism(organism):
    m, rec = organism("induction"), findings("induction")
    assert A.task_accuracy(m, "repeat", n=100, seed=1) >= rec["accuracy"]["repeat"] - ACC_MARGIN
    loss = A.repeat_loss(m)
    assert loss["second_half"] < 0.5 * loss["first_half"]
    found = {h for h, *_ in A.find_induction_heads(m)}
    assert found == {h for h, *_ in rec["induction_heads"]}
    # each induction head's offset is matched by a look-back head of that lag in layer 0
    lags = {off for _, _, off in A.find_prev_token_heads(m, 0.4, offsets=(1, 2, 3, 4))}
    assert {off for _, _, off in rec["induction_heads"]} <= lags


def test_multitask_accuracy(organism):
    m, rec = organism("multitask"), findings("multitask")
    # another sample than the recorded one: fresh prompts from the training word lists, then
    # words held out of each task (where the organism generalises poorly: recorded, not hidden)
    for split, key in (("train", "accuracy"), ("test", "accuracy_held_out_words")):
        for task, acc in rec[key].items():
            got = A.task_accuracy(m, task, n=200, seed=A.EVAL_SEED + 1, split=split)
            assert got >= acc - ACC_MARGIN, f"{task} ({split}): {got:.3f} < {acc:.3f} - margin"


# --- a quick retrain finds the mechanism again -------------------------------------------------


@pytest.mark.heavy  # trains an organism: minutes of CPU
def test_induction_retrain_finds_mechanism_again(tmp_path):
    out = run(["induction", "--out", str(tmp_path / "ind"), "--seed", "1"])
    m = load_model(str(out), device="cpu")
    assert A.task_accuracy(m, "repeat", n=100, seed=2) > 0.9
    heads = A.find_induction_heads(m)
    assert heads and all(h.startswith("1.") for h, *_ in heads), heads


# --- sabotage: the analysis must notice ---------------------------------------------------------


def test_bigram_sabotaged_unembedding_is_noticed(tmp_path):
    def reinit(sd):
        g = torch.Generator().manual_seed(0)
        sd["lm_head.weight"] = torch.randn(sd["lm_head.weight"].shape, generator=g) * 0.02

    m = load_model(str(_copy_with(tmp_path, "bigram", reinit)), device="cpu")
    fit = A.bigram_fit(m)
    assert fit["kl"] > 1.0 and fit["logit_corr"] < 0.3


def test_induction_sabotaged_lookback_heads_is_noticed(tmp_path):
    rec = findings("induction")
    layer0 = [h for h, *_ in rec["lookback_heads"]]
    m = load_model(str(_copy_with(tmp_path, "induction",
                                  lambda sd: _zero_heads(sd, layer0, 4))), device="cpu")
    assert A.find_induction_heads(m) == []
    assert A.task_accuracy(m, "repeat", n=100, seed=1) < 0.3


def test_multitask_sabotaged_surname_mover_is_noticed(tmp_path):
    """FINDINGS: in name recall, one head's output alone restores the surname (patching). Zero
    that head's output weights: patching then finds no such head, and recall weakens."""
    rec = findings("multitask")
    head, restored = rec["recall"]["patching_top"][0]
    assert restored > 0.8
    family = lang.recall_prompts(100, seed=A.EVAL_SEED, template=rec["recall"]["template"])
    m = load_model(str(_copy_with(tmp_path, "multitask",
                                  lambda sd: _zero_heads(sd, [head], 4))), device="cpu")
    patch = A.head_patching(m, family)
    assert abs(float(patch["restored"][A._hl(head)])) < 0.05
    assert patch["clean"] < 0.5 * rec["recall"]["clean_logit_diff"]


# --- bad input -----------------------------------------------------------------------------------


def test_truncated_weights_named(tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(fixture_dir("induction"), out)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load_model(str(out), device="cpu")


def test_missing_tokenizer_named(tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(fixture_dir("bigram"), out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json"):
        load_model(str(out), device="cpu")


def test_recipe_is_byte_for_byte_and_refuses_a_different_checkpoint(tmp_path, capsys):
    out = tmp_path / "b"
    run(["bigram", "--out", str(out), "--steps", "20"])
    first = (out / "model.safetensors").read_bytes()
    run(["bigram", "--out", str(out), "--steps", "20"])  # same recipe: retrained and compared
    assert "reproduced byte for byte" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == first
    with pytest.raises(RecipeError, match=r"already holds a different checkpoint.*--overwrite"):
        run(["bigram", "--out", str(out), "--steps", "21"])
    assert (out / "model.safetensors").read_bytes() == first
    run(["bigram", "--out", str(out), "--steps", "21", "--overwrite"])
    assert json.loads((out / "training.json").read_text())["recipe"]["steps"] == 21


def test_recipe_rejects_bad_mix(tmp_path):
    with pytest.raises(RecipeError, match="unknown task 'poetry'"):
        run(["multitask", "--out", str(tmp_path / "m"), "--mix", "ioi=1,poetry=2"])


# --- the language ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", lang.TASKS)
def test_prompts_tokenize_as_families(task, organism):
    m = organism("multitask")
    for template in range(3 if task != "repeat" else 1):
        kw = {"template": template} if task != "repeat" else {"length": 6, "prefix": 2}
        items = lang.prompts(task, 8, seed=3, split="test", **kw)
        tf = lang.as_family(f"{task}-{template}", items).tokenize(m)
        assert tf.clean.shape == tf.corrupted.shape
        words = ["<bos>", *items[0]["clean"].split()]
        for name, pos in items[0]["positions"].items():
            assert int(tf.positions[name][0]) == pos + 1, name
            assert words[pos + 1] == tf.str_tokens[pos + 1]
        assert (tf.answer_ids != tf.counterfactual_ids).all()


def test_held_out_words_are_disjoint():
    assert not set(lang.names("train")) & set(lang.names("test"))
    assert not set(lang.surnames("train")) & set(lang.surnames("test"))
    assert not set(lang.places("train")) & set(lang.places("test"))
    for d in lang.ioi_prompts(50, seed=0, split="test"):
        assert d["IO"] in lang.names("test") and d["S"] in lang.names("test")
    with pytest.raises(ValueError, match="split 'dev'"):
        lang.names("dev")


def test_ioi_positions_and_orders():
    for order in ("ABBA", "BABA"):
        for d in lang.ioi_prompts(20, seed=1, order=order, template=1):
            w = d["clean"].split()
            assert w[d["positions"]["IO"]] == d["IO"]
            assert w[d["positions"]["S1"]] == w[d["positions"]["S2"]] == d["S"]
            assert (d["positions"]["IO"] < d["positions"]["S1"]) == (order == "ABBA")
            assert len(d["corrupted"].split()) == len(w)
