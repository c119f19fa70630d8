"""Components by role (``mechtests.suite.roles``): a claim follows its mechanism onto other heads.

A copy of the multitask organism whose heads are renumbered within each layer computes the same
function (to 1e-5), so every claim about it must hold, its heads *moved*; ``--strict-components``
(the very same heads) must fail there. The seed-7 induction organism keeps the circuit on other
heads. And a role claim still fails where the mechanism is gone: a randomly initialised copy,
the mechanism's heads zeroed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechtests.core.models import organisms_dir
from mechtests.suite.mutate import permute_heads
from mechtests.suite.roles import Cast, Role, RoleVacant, cast, verdict

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
SEED7 = ROOT / "fixtures" / "checkpoints" / "induction-seed7"

# new head j of layer L is old head PERMS[L][j]: 3.3 -> 3.0, 1.1 -> 1.2, 0.3 -> 0.1
PERMS = {0: [2, 3, 0, 1], 1: [0, 3, 1, 2], 2: [1, 0, 3, 2], 3: [3, 0, 1, 2]}


def where(head: str, perms: dict[int, list[int]] = PERMS) -> str:
    """Where old head ``head`` lives after ``permute_heads(perms)``."""
    layer, h = (int(x) for x in head.split("."))
    return f"{layer}.{perms[layer].index(h)}"


def renumbered(organism: str, out: Path, perms: dict[int, list[int]] = PERMS) -> Path:
    """A copy of the organism with its heads renumbered within each layer (same function)."""
    from types import SimpleNamespace

    src = organisms_dir() / organism
    shutil.copytree(src, out)
    state = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    permute_heads(state, SimpleNamespace(n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                                         n_layer=cfg["n_layer"]), perms)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def run_claims(pytester: pytest.Pytester, files: list[str], model: Path | str, *args: str):
    return pytester.runpytest(*(str(ROOT / "claims" / f) for f in files), "--model", str(model),
                              "--report-dir", "out", "-p", "no:cacheprovider", "-q", *args)


def report_of(pytester: pytest.Pytester) -> dict:
    return json.loads(next(pytester.path.glob("out/run-*/report.json")).read_text())


def by_claim(data: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for claim in data["claims"]:
        for cell in claim["cells"].values():
            out.setdefault(claim["id"], []).extend(cell["tests"])
    return out


@pytest.fixture(scope="module")
def multitask_renumbered(tmp_path_factory) -> Path:
    return renumbered("multitask", tmp_path_factory.mktemp("renumbered") / "multitask")


def test_the_renumbered_copy_computes_the_same_function(multitask_renumbered):
    from transformers import GPT2LMHeadModel

    a = GPT2LMHeadModel.from_pretrained(organisms_dir() / "multitask", use_safetensors=True).eval()
    b = GPT2LMHeadModel.from_pretrained(multitask_renumbered, use_safetensors=True).eval()
    tokens = torch.randint(2, a.config.vocab_size, (4, 20), generator=torch.Generator()
                           .manual_seed(0))
    with torch.no_grad():
        la, lb = a(tokens).logits, b(tokens).logits
    assert (la - lb).abs().max() < 1e-5
    sa, sb = a.state_dict(), b.state_dict()
    assert not torch.equal(sa["transformer.h.3.attn.c_proj.weight"],
                           sb["transformer.h.3.attn.c_proj.weight"])


ROLE_CLAIMS = {"ioi.name_movers": ("3.3", "1.1"), "ioi.knockout": ("3.3", "1.1"),
               "contraction.top_head": ("0.3",), "contraction.attention": ("0.3",),
               "contraction.values_not_pattern": ("0.3",)}


def test_claims_hold_moved_on_a_renumbered_copy(pytester, multitask_renumbered):
    """Every head claim holds there, its heads moved to exactly where the renumbering put
    them, and the strict question (the very same heads) is answered beside: failed."""
    res = run_claims(pytester, ["test_ioi.py", "test_contraction.py"], multitask_renumbered)
    out = res.stdout.str()
    assert res.ret == 0, out[-3000:]
    data = report_of(pytester)
    tests = by_claim(data)
    for claim, heads in ROLE_CLAIMS.items():
        for t in tests[claim]:
            assert t["outcome"] == "moved", (claim, t["outcome"], t["reason"])
            assert t["moved"] == {h: where(h) for h in heads}, (claim, t["moved"])
            assert t["beside"]["question"] == "strict", t
            assert t["beside"]["outcome"] == "failed", t
            assert "the very same heads must play the role" in t["beside"]["reason"]
    # claims about layers (not heads) and behaviour hold unmoved
    for claim in ("ioi.logit_diff",):
        assert all(t["outcome"] == "held" and not t["moved"] for t in tests[claim])
    assert "held, moved" in out and "3.3 -> 3.0" in out
    md = next(pytester.path.glob("out/run-*/report.md")).read_text()
    assert "3.3 → 3.0" in md and "strict (the very same heads): failed" in md


def test_strict_components_fails_on_the_renumbered_copy(pytester, multitask_renumbered):
    res = run_claims(pytester, ["test_ioi.py", "test_contraction.py"], multitask_renumbered,
                     "--strict-components", "-k", "name_movers or knocking or one_head")
    data = report_of(pytester)
    tests = by_claim(data)
    for claim in ("ioi.name_movers", "ioi.knockout", "contraction.top_head"):
        for t in tests[claim]:
            assert t["outcome"] == "failed", (claim, t["outcome"])
            moved = {h: where(h) for h in ROLE_CLAIMS[claim]}
            assert f"missing {list(moved)}" in t["reason"], t["reason"]
            assert f"among {list(moved.values())}" in t["reason"], t["reason"]
            assert t["beside"] == {"question": "role", "outcome": "held", "reason": ""}, t
    assert res.ret == 1


def test_strict_components_holds_on_the_organism_itself(pytester):
    res = run_claims(pytester, ["test_contraction.py"], "multitask", "--strict-components",
                     "-k", "one_head")
    assert res.ret == 0, res.stdout.str()[-2000:]
    (t,) = by_claim(report_of(pytester))["contraction.top_head"]
    assert t["outcome"] == "held" and t["beside"] is None


# -- the unit: cast and verdict ---------------------------------------------------------------
class FakeRecord:
    def __init__(self, strict: bool = False):
        from types import SimpleNamespace

        opts = {"--strict-components": strict}
        self._node = SimpleNamespace(user_properties=[], config=SimpleNamespace(
            getoption=lambda name, default=None: opts.get(name, default)))
        self.casts: list = []
        self.besides: list = []

    def measured(self, *a, **k):
        self._node.user_properties.append(("measured", a))

    def cast(self, *a):
        self.casts.append(a)

    def beside(self, *a):
        self.besides.append(a)

    def aside(self):
        from mechtests.suite.report import Record

        return Record.aside(self)  # type: ignore[arg-type]


SUBJECT = type("S", (), {"name": "organism", "mutant": ""})()
OTHER = type("S", (), {"name": "seed7", "mutant": ""})()
ROLE = Role("movers", "the two heads beyond layer 0 with the highest score, each >= 0.5")
SCORES = {"0.0": 9.0, "1.0": 0.9, "1.1": 0.2, "1.2": 0.7, "2.0": 0.6}


def test_cast_ranks_eligible_heads_over_the_floor_and_pairs_what_moved():
    c = cast(OTHER, "organism", ROLE, ["1.0", "2.3"], SCORES, FakeRecord(), floor=0.5,
             eligible=lambda h: h.layer > 0)
    assert c.found == ("1.0", "1.2") and c.moved == {"2.3": "1.2"} and not c.vacant
    assert not c.reference
    c = cast(OTHER, "organism", ROLE, ["1.0", "2.3"], SCORES, FakeRecord(), floor=0.8,
             eligible=lambda h: h.layer > 0)
    assert c.found == ("1.0",) and c.vacant == ("2.3",)
    low = cast(OTHER, "organism", ROLE, ["1.1"], SCORES, FakeRecord(), floor=0.5,
               largest=False)
    assert low.found == ("1.1",) and low.moved == {}


def test_verdict_checks_whoever_plays_the_role_and_answers_strict_beside():
    seen: list = []
    rec = FakeRecord()
    c = cast(OTHER, "organism", ROLE, ["1.0", "2.3"], SCORES, rec, floor=0.5,
             eligible=lambda h: h.layer > 0)
    verdict(c, lambda heads: seen.append(tuple(heads)), rec)
    assert seen[-1] == ("1.0", "1.2")  # the verdict's check ran on who plays the role
    (question, outcome, reason), = rec.besides
    assert question == "strict" and outcome == "failed" and "2.3" in reason


def test_on_the_reference_the_role_must_resolve_to_its_heads():
    rec = FakeRecord()
    c = cast(SUBJECT, "organism", ROLE, ["1.0", "2.3"], SCORES, rec, floor=0.5,
             eligible=lambda h: h.layer > 0)
    assert c.reference
    with pytest.raises(AssertionError, match="resolves to its published"):
        verdict(c, lambda heads: None, rec)


def test_a_vacant_role_fails_saying_no_component_plays_it():
    rec = FakeRecord()
    c = cast(OTHER, "organism", ROLE, ["1.0", "2.3"], SCORES, rec, floor=0.95,
             eligible=lambda h: h.layer > 0)
    assert c.found == () and c.vacant == ("1.0", "2.3")
    with pytest.raises(RoleVacant, match="no component plays the role 'movers'"):
        verdict(c, lambda heads: None, rec)


def test_strict_mode_checks_the_reference_heads():
    seen: list = []
    rec = FakeRecord(strict=True)
    c = cast(OTHER, "organism", ROLE, ["1.0", "1.2"], SCORES, rec, floor=0.5,
             eligible=lambda h: h.layer > 0)
    assert c.components == ("1.0", "1.2") and not c.moved
    verdict(c, lambda heads: seen.append(tuple(heads)), rec)
    assert seen == [("1.0", "1.2")] and rec.besides == []  # unmoved: one question, one answer
    c = cast(OTHER, "organism", ROLE, ["1.0", "2.3"], SCORES, rec, floor=0.5,
             eligible=lambda h: h.layer > 0)
    with pytest.raises(AssertionError, match="the very same heads"):
        verdict(c, lambda heads: seen.append(tuple(heads)), rec)
    assert rec.besides[-1] == ("role", "held", "")
    assert isinstance(c, Cast)


# -- a role claim still fails where the mechanism is gone ----------------------------------------
def test_no_head_plays_the_name_movers_role_with_layers_1_and_3_zeroed(pytester, tmp_path):
    """3.3 and 1.1 zeroed alone, backup heads take the role (tests/test_claims_break.py); with
    every head of layers 1 and 3 zeroed, none can: each IOI head claim fails, saying so."""
    from tests.test_claims_break import zero_heads

    broken = zero_heads("multitask", [f"{layer}.{h}" for layer in (1, 3) for h in range(4)],
                        tmp_path / "zero")
    res = run_claims(pytester, ["test_ioi.py"], broken, "-k", "name_movers or knocking")
    tests = by_claim(report_of(pytester))
    for claim in ("ioi.name_movers", "ioi.knockout"):
        for t in tests[claim]:
            assert t["outcome"] == "failed", (claim, t["outcome"], t["reason"])
            assert "no component plays the role 'name movers'" in t["reason"], t["reason"]
            assert t["beside"]["question"] == "strict" and t["beside"]["outcome"] == "failed"
    assert res.ret == 1


def test_role_claims_fail_on_a_random_copy_of_the_organisms(pytester, tmp_path):
    from tests.test_claims_break import random_copy

    for organism, files in (("induction", ["test_induction.py"]),
                            ("multitask", ["test_ioi.py", "test_contraction.py"])):
        model = random_copy(organism, tmp_path / organism)
        run_claims(pytester, files, model, "-k", "not logit_diff and not some_head")
        data = report_of(pytester)
        for claim, tests in by_claim(data).items():
            assert all(t["outcome"] in ("failed", "inconclusive", "skipped") for t in tests), \
                (claim, [(t["outcome"], t["reason"]) for t in tests])
        shutil.rmtree(next(pytester.path.glob("out")))


# -- the seed-7 induction organism: the same circuit on other heads, its look-back head gone ---
def test_seed7_induction_heads_moved_and_its_look_back_head_is_gone(pytester):
    """Measured (offset 3): layer-1 induction scores 0.541 0.557 0.536 0.503 (the organism's
    0.551 0.577 0.606 0.625), top two 1.1 and 1.0; knocking them out still raises the repeat
    loss. No layer-0 head looks 3 back with 0.45 of its attention (best 0.1 at 0.353; its
    layer-0 heads spread over 2-4 back, 0.25-0.35 each), so the look-back head is gone."""
    assert (SEED7 / "model.safetensors").stat().st_size < 1_000_000
    res = run_claims(pytester, ["test_induction.py"], SEED7)
    tests = by_claim(report_of(pytester))
    for claim in ("induction.heads", "induction.ablation"):
        (t,) = tests[claim]
        assert t["outcome"] == "moved", (claim, t["outcome"], t["reason"])
        assert t["moved"] == {"1.3": "1.1", "1.2": "1.0"}, t["moved"]
        assert t["beside"]["outcome"] == "failed"
    (t,) = tests["induction.previous_token"]
    assert t["outcome"] == "failed"
    assert "no component plays the role 'look-back head'" in t["reason"], t["reason"]
    (t,) = tests["induction.exists"]
    assert t["outcome"] == "held"
    assert res.ret == 1


# -- behaviour claims run wherever their prompts can be written ---------------------------------
def test_behaviour_claim_runs_on_any_shape_that_can_express_its_family(pytester, tmp_path):
    """ioi.logit_diff names no component: on a 2-layer model with the multitask organism's
    tokenizer it runs (and fails: random weights). The head claims, with no reference of that
    shape, cast their roles anew and are judged too: never skipped for the shape. (The induction
    organism shares that tokenizer: it runs there too, and fails: CI lows -0.43 and -1.37.)
    A tokenizer without IOI's words skips, saying so."""
    from transformers import GPT2Config, GPT2LMHeadModel

    src = organisms_dir() / "multitask"
    out = tmp_path / "small"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config.from_pretrained(src, n_layer=2)).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    run_claims(pytester, ["test_ioi.py"], out)
    tests = by_claim(report_of(pytester))
    assert {t["outcome"] for t in tests["ioi.logit_diff"]} == {"failed"}, tests["ioi.logit_diff"]
    movers = tests["ioi.name_movers"]
    assert not any("no reference of this checkpoint's shape" in t["reason"] for t in movers)
    assert {t["outcome"] for t in movers} <= {"inconclusive", "failed", "skipped"}, movers
    assert all("cannot express" in t["reason"] for t in movers if t["outcome"] == "skipped")


def test_behaviour_claim_skips_saying_the_tokenizer_cannot_express_its_family(pytester,
                                                                              tiny_model_dir):
    # in a subprocess: an in-process run after another can hold two copies of PromptError
    res = pytester.runpytest_subprocess(str(ROOT / "claims" / "test_ioi.py"), "--model",
                                        str(tiny_model_dir), "--no-report", "-p",
                                        "no:cacheprovider", "-q", "-rs", "-k", "prefers")
    out = res.stdout.str()
    assert "tokenizer cannot express the 'ioi' prompt family 'ABBA' of any reference" in out, \
        out[-2000:]
    assert "multitask's: family" in out and "gpt2's: family" in out


def test_mutation_judges_a_role_claim_by_where_its_heads_went():
    from mechtests.suite.mutate import judge

    assert judge("moved", "moved", same=True)
    assert not judge("moved", "held", same=True) and not judge("moved", "moved", same=False)
    assert judge("fail", "moved", same=False, left=True)  # found the mechanism elsewhere
    assert not judge("fail", "moved", same=False, left=False)  # still casts the broken head
    assert not judge("fail", "held", same=True, left=True)
    # a checkpoint whose heads had already moved (seed 1: 3.3 -> 1.3): an unrelated mutant must
    # leave the role on those same heads, not send it elsewhere
    assert judge("hold", "moved", same=False, as_before=True)
    assert not judge("hold", "moved", same=False, as_before=False)
    assert judge("hold", "held", same=False) and not judge("hold", "failed", same=False,
                                                              as_before=True)
