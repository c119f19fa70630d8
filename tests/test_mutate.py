"""Mutation testing of claims (``--mutate``): the mutants, the verdicts, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mechtests.core.engine import engine_for
from mechtests.core.models import remember, spec_of
from mechtests.suite import mutate as mu

pytest_plugins = ["pytester"]


def test_relabel_preserves_the_function_and_moves_the_heads(tiny_model):
    mutant = mu.build_mutant(tiny_model, mu.Mutant("relabel", "same", mu.relabel))
    tokens = torch.tensor([[0, 5, 9, 11, 3, 7]])
    a, _ = engine_for(tiny_model).run(tokens)
    b, _ = engine_for(mutant).run(tokens)
    assert torch.allclose(a, b, atol=1e-5)
    # head h now lives at h + 1
    assert torch.allclose(mutant.W_Q[1, 1], tiny_model.W_Q[1, 0], atol=1e-6)
    assert torch.allclose(mutant.W_O[0, 0], tiny_model.W_O[0, 3], atol=1e-6)
    assert mu.relabelled("1.3", 2, 4) == "1.0" and mu.relabelled("mlp_1", 2, 4) == "mlp_1"


def test_breaks_hit_only_the_named_head(tiny_model):
    tokens = torch.tensor([[0, 5, 9, 11, 3, 7]])
    names = ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z"]
    _, clean = engine_for(tiny_model).run(tokens, names)
    qk = mu.build_mutant(tiny_model, mu.Mutant("QK 1.2", "fail", mu.break_qk("1.2")))
    _, acts = engine_for(qk).run(tokens, names)
    pattern = acts["blocks.1.attn.hook_pattern"][0, 2]
    uniform = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7)[:, None]
    assert torch.allclose(pattern, uniform, atol=1e-6)
    assert torch.allclose(acts["blocks.1.attn.hook_pattern"][0, 1],
                          clean["blocks.1.attn.hook_pattern"][0, 1], atol=1e-6)
    ov = mu.build_mutant(tiny_model, mu.Mutant("OV 1.2", "fail", mu.break_ov("1.2")))
    assert float(ov.W_O[1, 2].abs().max()) == 0 and float(ov.W_O[1, 1].abs().max()) > 0


def test_noise_is_small_and_seeded(tiny_model):
    a = mu.build_mutant(tiny_model, mu.Mutant("noise", "hold", mu.noise_all))
    b = mu.build_mutant(tiny_model, mu.Mutant("noise", "hold", mu.noise_all))
    assert torch.equal(a.W_Q, b.W_Q)
    rel = float((a.W_in - tiny_model.W_in).std() / tiny_model.W_in.std())
    assert 0.003 < rel < 0.03


def test_mutants_of_a_claim():
    names = [m.name for m in mu.mutants(["1.2", "mlp_0"], ("qk", "ov"), False, 2, 4)]
    assert names == ["relabel", "QK 1.2", "OV 1.2", "OV mlp_0", "unnamed", "noise"]
    exp = {m.name: m.expected for m in mu.mutants(["attn_1"], ("ov",), False, 2, 4)}
    assert exp == {"relabel": "same", "OV attn_1": "fail", "unnamed": "hold", "noise": "hold"}
    together = mu.mutants(["1.0", "1.1"], ("qk",), True, 2, 4, together=True)
    assert [m.name for m in together] == ["relabel", "QK 1.0+1.1", "unnamed", "noise"]


def test_a_role_that_is_a_whole_layer_is_the_same_set_after_relabel():
    """Rotating heads within a layer maps a role made of every head of a layer onto itself:
    the claim must hold on the same heads with the same values (nothing moves)."""
    def relabel_expect(heads):
        return next(m.expected for m in mu.mutants(heads, ("qk",), False, 2, 4, by_role=True)
                    if m.name == "relabel")

    assert relabel_expect(["1.0", "1.1", "1.2", "1.3"]) == "same"
    assert relabel_expect(["1.0", "1.1"]) == "moved"
    assert relabel_expect(["1.0", "1.1", "1.2", "1.3", "0.1"]) == "moved"


@pytest.mark.parametrize("bad,msg", [("5.1", "not in a 2-layer"), ("head9", "write a head as")])
def test_bad_components_are_named(bad, msg):
    with pytest.raises(mu.MutationError, match=msg):
        mu.mutants([bad], ("qk",), False, 2, 4)


def test_verdicts():
    ok = {"expected": "fail", "outcome": "failed", "ok": True}
    assert mu.verdict({"QK 1.0": ok}) == "discriminating"
    assert mu.verdict({"QK 1.0": ok, "OV 1.0": {"expected": "fail", "outcome": "held",
                                                 "ok": False}}) == "cannot fail when OV 1.0 breaks"
    assert mu.verdict({"noise": {"expected": "hold", "outcome": "failed", "ok": False}}) \
        == "fragile under noise"
    assert mu.verdict({"relabel": {"expected": "same", "outcome": "held", "ok": False}}) \
        == "index-dependent under relabel"
    assert mu.judge("fail", "inconclusive", False) and not mu.judge("fail", "error", False)
    merged = mu.merge([{"components": ["1.0"], "matrix": {"QK 1.0": ok}},
                       {"components": ["1.0"], "matrix": {"QK 1.0": {
                           "expected": "fail", "outcome": "held", "ok": False}}}])
    assert merged["verdict"] == "cannot fail when QK 1.0 breaks"
    assert merged["matrix"]["QK 1.0"]["runs"] == 2


CLAIMS = """
import pytest

@pytest.mark.claim(id="always", source="test", subjects=["tiny"])
def test_always(subject, record):
    record.components(["1.0"])
    record.measured(1.0, 0.5, ">=", "a constant")

@pytest.mark.claim(id="nameless", source="test", subjects=["tiny"])
def test_nameless(subject, record):
    record.measured(1.0, 0.5, ">=", "a constant")

@pytest.mark.claim(id="broken", source="test", subjects=["tiny"])
def test_broken(subject, record):
    record.components(["1.0"])
    assert False, "does not hold"
"""


def test_mutate_reports_kill_matrix_and_bad_input(pytester, tiny_model_dir):
    pytester.makepyfile(CLAIMS)
    res = pytester.runpytest("--model", str(tiny_model_dir), "--mutate",
                             "--report-dir", "out", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=2, failed=1)
    out = res.stdout.str()
    assert "broken: not run:" in out and "did not hold on its subject" in out
    assert "always [1.0]: cannot fail when heads are renumbered" in out
    assert "nameless: not run:" in out and "names no components" in out
    assert "record.components" in out and "Traceback" not in out
    data = json.loads(next(pytester.path.glob("out/run-*/report.json")).read_text())
    m = data["mutation"]["always"]
    assert m["matrix"]["QK 1.0"] == {"expected": "fail", "outcome": "held", "ok": False,
                                     "runs": 1, "reasons": []}
    assert m["matrix"]["noise"]["ok"] and m["matrix"]["unnamed"]["ok"]


def test_a_model_mutants_cannot_be_built_for_gets_a_message(tiny_model, tmp_path):
    shutil.copytree(spec_of(tiny_model).path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))

    class Fake:
        pass

    fake = Fake()
    remember(fake, type(spec_of(tiny_model))("m", tmp_path / "m", "m"))
    with pytest.raises(mu.MutationError,
                       match="GPT-2-, Llama- and Gemma 3-architecture checkpoints only"):
        mu.build_mutant(fake, mu.Mutant("noise", "hold", mu.noise_all))
