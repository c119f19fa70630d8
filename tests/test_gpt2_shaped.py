"""Every GPT-2 claim runs to a verdict on a GPT-2-shaped model with random weights and GPT-2's
real tokenizer (``mechtests.testing.save_gpt2_shaped_checkpoint``), as ``pytest claims/ --model
DIR`` does: nothing errors (every failure is the claim's own assertion), and nothing holds.

GPT-2's weights cannot reach these machines; this is as close as the suite gets to the run a
user with the weights makes, and the check that no GPT-2 claim holds on noise.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy  # every GPT-2 claim on a GPT-2-small-sized model: minutes of CPU
ROOT = Path(__file__).resolve().parent.parent

# Claims that hold on random weights, so cannot tell GPT-2 from noise. Listed, not hidden:
# ``test_no_gpt2_claim_holds_on_noise`` is a strict xfail while this is non-empty. (It held
# ``gender.neurons`` until the effect-size guard made that claim inconclusive on noise.)
HOLDS_ON_NOISE: set[str] = set()

# Claims written only for an organism (no GPT-2 reference): they skip on GPT-2's shape.
NOT_ABOUT_GPT2 = {
    "test_bigram.py::test_embedding_times_unembedding_is_the_bigram_table",
    "test_skip_trigram.py::test_patching_the_heads_moves_the_completion",
    "test_skip_trigram.py::test_the_language_is_read_off_the_qk_and_ov_circuits",
}


@pytest.fixture(scope="module")
def gpt2_shaped(tmp_path_factory):
    from mechtests.testing import save_gpt2_shaped_checkpoint

    return save_gpt2_shaped_checkpoint(tmp_path_factory.mktemp("gpt2_shaped") / "model")


@pytest.fixture(scope="module")
def verdicts(gpt2_shaped, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, message)}`` for every claim test run against the model, as a user
    runs it (a fresh ``python -m pytest claims/ --model DIR``). Outcome: passed, failed (the
    claim's AssertionError), error (any other exception, in the test or its set-up),
    inconclusive (the effect-size guard), skipped."""
    out_dir = tmp_path_factory.mktemp("run")
    xml = out_dir / "claims.xml"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "claims"), "--model",
                    str(gpt2_shaped), "--no-report", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={xml}", "-o", "junit_logging=no"],
                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    got: dict[str, tuple[str, str]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        test = f"{case.get('classname').split('.')[-1]}.py::{case.get('name')}"
        found = {c.tag: c.get("message", "") for c in case}
        if "error" in found:
            got[test] = ("error", found["error"])
        elif "failure" in found:
            msg = found["failure"]
            got[test] = ("failed" if _is_assertion(msg) else "error", msg)
        elif "skipped" in found:
            msg = found["skipped"]
            got[test] = ("inconclusive" if msg.startswith("Inconclusive") else "skipped", msg)
        else:
            got[test] = ("passed", "")
    assert got, f"no claim test ran: {xml.read_text()[:2000]}"
    return got


def _is_assertion(message: str) -> bool:
    """A junit failure message names its exception's class: the claim's own assertion is an
    AssertionError or a subclass of it (``RoleVacant``: no component plays the role)."""
    name = message.split(":", 1)[0].strip()
    if name == "AssertionError":
        return True
    module, _, cls = name.rpartition(".")
    try:
        return issubclass(getattr(importlib.import_module(module), cls), AssertionError)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def _base(test: str) -> str:
    return test.split("[", 1)[0]


def claim_functions() -> set[str]:
    """Every claim test function in claims/ (``file.py::name``), read from the source."""
    found = set()
    for path in sorted((ROOT / "claims").glob("test_*.py")):
        module = importlib.import_module(f"claims.{path.stem}")
        for name, fn in vars(module).items():
            if name.startswith("test") and any(m.name == "claim"
                                               for m in getattr(fn, "pytestmark", [])):
                found.add(f"{path.name}::{name}")
    return found


def test_every_gpt2_claim_runs_to_a_verdict_and_none_errors(verdicts):
    errors = {t: m for t, (o, m) in verdicts.items() if o == "error"}
    assert not errors, errors
    ran = {_base(t) for t, (o, _) in verdicts.items() if o in ("passed", "failed", "inconclusive")}
    assert ran == claim_functions() - NOT_ABOUT_GPT2, verdicts


def test_only_claims_about_other_models_skip(verdicts):
    """A GPT-2-shaped model is not an organism: only claims written solely for an organism's
    component indices skip (saying why); every claim written for GPT-2 runs."""
    skipped = {_base(t): m for t, (o, m) in verdicts.items() if o == "skipped"}
    assert set(skipped) == NOT_ABOUT_GPT2, skipped
    assert all(skipped.values()), skipped


def test_nothing_but_the_listed_claims_holds_on_noise(verdicts):
    held = {_base(t) for t, (o, _) in verdicts.items() if o == "passed"}
    assert held <= HOLDS_ON_NOISE, f"claims that hold on a random GPT-2-shaped model: {held}"


@pytest.mark.xfail(bool(HOLDS_ON_NOISE), strict=True,
                   reason=f"holds on random weights (issue 11 is fixing it): {HOLDS_ON_NOISE}")
def test_no_gpt2_claim_holds_on_noise(verdicts):
    held = sorted(t for t, (o, _) in verdicts.items() if o == "passed")
    assert not held, f"claims that hold on a random GPT-2-shaped model: {held}"
