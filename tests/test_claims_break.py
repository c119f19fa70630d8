"""A claim earns its place by failing when the mechanism is broken.

Each organism claim file is run (as a user would, ``pytest claims/... --model DIR``) against
copies of the organism whose mechanism has been knocked out: all weights re-initialised, or the
mechanism's heads' output weights zeroed. The claims must not hold there: they fail, or, where
the model no longer tells clean from corrupted prompts apart, they are inconclusive (the
effect-size guard), never held. Below those, one test per defect found in review (issue 11),
each of which the old claims did not catch.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from mechtests.core.models import organisms_dir
from mechtests.testing import broken_copy

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent


def random_copy(organism: str, out: Path, seed: int = 1234) -> Path:
    """The organism's architecture and tokenizer with freshly initialised weights."""
    return broken_copy(organisms_dir() / organism, out, random_init=True, seed=seed)


def zero_heads(organism: str, heads: list[str], out: Path) -> Path:
    """A copy of the organism with the listed heads' output weights (W_O rows) zeroed."""
    return broken_copy(organisms_dir() / organism, out, heads)


def run_claims(pytester: pytest.Pytester, claim_file: str, model: Path, *args: str):
    return pytester.runpytest(str(ROOT / "claims" / claim_file), "--model", str(model),
                              "--no-report", "-p", "no:cacheprovider", "-q", *args)


def outcomes(res) -> dict[str, int]:
    return {k: v for k, v in res.parseoutcomes().items()
            if k in ("passed", "moved", "failed", "error", "errors", "inconclusive")}


def not_held(got: dict[str, int]) -> bool:
    """Nothing held, nothing crashed, and at least one claim failed outright."""
    return got.get("failed", 0) >= 1 and not got.get("passed") and not got.get("error") \
        and not got.get("errors")


@pytest.mark.parametrize("organism,claim_file", [("bigram", "test_bigram.py"),
                                                 ("induction", "test_induction.py")])
def test_claims_fail_on_a_randomly_initialised_organism(pytester, tmp_path, organism,
                                                        claim_file):
    res = run_claims(pytester, claim_file, random_copy(organism, tmp_path / "random"))
    got = outcomes(res)
    assert not_held(got), got


def test_induction_knockout_claim_fails_when_the_heads_are_gone(pytester, tmp_path):
    from claims.test_induction import REFS

    broken = zero_heads("induction", list(REFS["induction"].induction_heads), tmp_path / "zero")
    res = run_claims(pytester, "test_induction.py", broken, "-k", "knocking")
    assert outcomes(res) == {"failed": 1}, res.stdout.str()[-2000:]


MULTITASK_CLAIMS = ("test_ioi.py", "test_resid_patching.py", "test_contraction.py",
                    "test_logit_lens.py", "test_gender.py", "test_token_attribution.py")


@pytest.mark.parametrize("claim_file", MULTITASK_CLAIMS)
def test_multitask_claims_fail_on_a_randomly_initialised_copy(pytester, tmp_path, claim_file):
    res = run_claims(pytester, claim_file, random_copy("multitask", tmp_path / "random"))
    got = outcomes(res)
    # a random model does not tell clean from corrupted: mechanism claims are inconclusive
    assert not got.get("passed") and not got.get("error") and not got.get("errors"), got
    assert got.get("failed", 0) + got.get("inconclusive", 0) >= 1, got


def claim_results(pytester: pytest.Pytester, claim_file: str, model: Path) -> list[dict]:
    """Each claim test's outcome (held, moved, failed, error, inconclusive, skipped), its claim's
    kind and the reference components it names with what breaks them (``record.components``)."""
    module = importlib.import_module(f"claims.{claim_file.removesuffix('.py')}")
    rec = pytester.inline_run(str(ROOT / "claims" / claim_file), "--model", str(model),
                              "--no-report", "-p", "no:cacheprovider", "-q")
    out = []
    for r in rec.getreports("pytest_runtest_logreport"):
        if r.when != "call" and not (r.when == "setup" and not r.passed):
            continue
        props = dict(r.user_properties)
        outcome = getattr(r, "mechtests_outcome", None) or {
            "passed": "held", "failed": "failed", "skipped": "skipped"}[r.outcome]
        comps = props.get("mechtests.components") or {}
        # a claim cast by role names the heads found on this checkpoint; its reference's are
        # the cast's "expected" (mechtests.suite.roles)
        named = {h for k, v in r.user_properties if k == "mechtests.cast"
                 for h in v.get("expected", ())}
        name = r.nodeid.split("::")[-1]
        marker = next(m for m in getattr(module, name.split("[")[0]).pytestmark
                      if m.name == "claim")
        out.append({"test": name, "outcome": outcome,
                    "kind": marker.kwargs.get("kind", "mechanism"),
                    "components": set(comps.get("components", ())) | named,
                    "breaks": set(comps.get("breaks", ()))})
    return out


@pytest.mark.parametrize("claim_file,heads", [
    ("test_ioi.py", ["3.3", "1.1"]),        # the name movers' outputs gone
    ("test_contraction.py", ["0.3"]),       # the contraction mover's output gone
])
def test_multitask_claims_fail_when_the_mechanism_heads_are_zeroed(pytester, tmp_path,
                                                                   claim_file, heads):
    """Zeroing a head's output weights breaks what it writes (OV), not where it looks (QK):
    no claim that names one of these heads for what it writes may hold on them. It fails, is
    inconclusive, or holds *moved*: on other heads that took the role (mechtests.suite.roles;
    e.g. IOI's backup name movers 1.0 and 1.2). None may error; claims about where the heads
    look and behaviour claims may hold."""
    got = claim_results(pytester, claim_file, zero_heads("multitask", heads, tmp_path / "zero"))
    ran = [t for t in got if t["outcome"] != "skipped"]
    assert ran and not [t for t in got if t["outcome"] == "error"], got
    writes = [t for t in ran if t["components"] & set(heads) and "ov" in t["breaks"]]
    assert writes, f"no claim in {claim_file} names {heads} for what they write: {got}"
    assert all(t["outcome"] in ("failed", "inconclusive", "moved") for t in writes), writes
    assert any(t["outcome"] == "failed" for t in writes), writes
    # nothing else may quietly stand in for them: a held test is a behaviour claim or one about
    # where the heads look
    held = [t for t in ran if t["outcome"] == "held"]
    assert all(t["kind"] == "behaviour" or t["breaks"] == {"qk"} for t in held), held


# -- one test per defect found in review (issue 11) ------------------------------------------------
def report_of(pytester: pytest.Pytester) -> dict:
    return __import__("json").loads(next(pytester.path.glob("out/run-*/report.json")).read_text())


@pytest.mark.parametrize("claim_file,heads,k", [
    # ioi.knockout tested only 3.3: {3.3 + any head} passed. With 1.1 alone gone it must fail.
    ("test_ioi.py", ["1.1"], "knocking"),
    # induction.ablation tested only 1.3: every pair with it passed. With 1.2 alone gone: fail.
    ("test_induction.py", ["1.2"], "knocking"),
])
def test_each_named_head_is_asserted_not_just_the_set(pytester, tmp_path, claim_file, heads, k):
    organism = "multitask" if claim_file == "test_ioi.py" else "induction"
    res = run_claims(pytester, claim_file, zero_heads(organism, heads, tmp_path / "zero"),
                     "-k", k)
    got = outcomes(res)
    assert got.get("failed", 0) >= 1 and not got.get("passed"), res.stdout.str()[-3000:]


def test_mutation_run_calls_the_reviewed_claims_discriminating(pytester):
    """values_not_pattern held with 0.3 swapped, its attention uniform and its heads renumbered;
    the knockout claims tested one head; recall's checks held by construction; token
    attribution hinged on one prompt. ``--mutate`` runs each on its mutants."""
    k = ("value_patching or knocking or surname_then or story_positions or steers")
    res = pytester.runpytest(*(str(ROOT / "claims" / f) for f in (
        "test_contraction.py", "test_ioi.py", "test_induction.py", "test_resid_patching.py",
        "test_token_attribution.py", "test_gender.py")), "-k", k, "--mutate",
        "--report-dir", "out", "-p", "no:cacheprovider", "-q")
    data = report_of(pytester)
    verdicts = {c: m["verdict"] for c, m in data["mutation"].items()}
    assert verdicts == {c: "discriminating" for c in (
        "contraction.values_not_pattern", "ioi.knockout", "induction.ablation",
        "recall.resid_patching", "token_attribution", "gender.steering")}, verdicts
    vnp = data["mutation"]["contraction.values_not_pattern"]["matrix"]
    assert {n: (m["expected"], m["outcome"]) for n, m in vnp.items()} == {
        "relabel": ("moved", "moved"), "QK 0.3": ("fail", "failed"),
        "OV 0.3": ("fail", "failed"), "unnamed": ("hold", "held"), "noise": ("hold", "held")}
    # gender.steering is a behaviour claim: nothing to break, values unmoved by a renumbering
    assert set(data["mutation"]["gender.steering"]["matrix"]) == {"relabel", "noise"}
    # recall's by-construction checks are reported as sanity checks, never as evidence
    recall = next(c for c in data["claims"] if c["id"] == "recall.resid_patching")
    ms = [m for cell in recall["cells"].values() for t in cell["tests"]
          for m in t["measurements"]]
    sanity = {m["what"]: m["value"] for m in ms if m["kind"] == "sanity"}
    assert abs(sanity["restoration at the surname before layer 0"] - 1) < 1e-5
    assert sanity["|restoration| at the last position before layer 0"] < 1e-5
    # token attribution: one prompt no longer decides it (64 prompts, margin over 0.8)
    tok = next(c for c in data["claims"] if c["id"] == "token_attribution")
    share = next(m["value"] for cell in tok["cells"].values() for t in cell["tests"]
                 for m in t["measurements"] if m["what"].startswith("share of story"))
    assert share - 0.8 > 1 / 64
    assert res.ret == 0


def test_contraction_top_head_is_a_claim_about_its_mixed_family():
    """The claim says 0.3 is top on templates 0 and 2 together, and why: on template 0 alone
    it is not top by either measure (the organism reads the cue by position there)."""
    from claims.families import _organism
    from mechtests.analysis.attribution import head_attribution
    from mechtests.analysis.patching import sweep
    from mechtests.core.engine import engine_for
    from mechtests.core.models import load_model
    from mechtests.organisms import language as lang

    model = load_model("multitask", "cpu")
    fam = _organism("contraction", lang.contraction_prompts, (0,), style="contracted")
    tf = fam.tokenize(model)
    dla = head_attribution(model, tf.clean, tf.answer_ids, tf.counterfactual_ids)
    patched = sweep(engine_for(model), "z", tf.clean, tf.corrupted, tf.logit_diff(),
                    by=("layer", "head"))
    assert dla.top_k(1)[0][0] == "1.3" and patched.top_k(1)[0][0] == "0.0"
    from claims import test_contraction

    assert "template 0" in test_contraction.__doc__ and "1.3" in test_contraction.__doc__


def test_induction_exists_on_a_zero_layer_model_fails_not_crashes(pytester):
    """It raised AttributeError on the bigram organism, shown as an ordinary failure."""
    res = run_claims(pytester, "test_induction.py", organisms_dir() / "bigram", "-k", "some_head")
    assert outcomes(res) == {"failed": 1}, res.stdout.str()[-2000:]
    assert "layers in the model: measured 0" in res.stdout.str()


def test_gender_steering_is_named_as_behaviour():
    from claims.test_gender import test_mean_difference_steers_in_proportion as t

    marker = next(m for m in t.pytestmark if m.name == "claim")
    assert marker.kwargs["kind"] == "behaviour"
