"""Every claim on a real pretrained model: SmolLM2-135M (``--model smollm2``), a model no claim
has a reference for. Each claim whose task its tokenizer can express reaches a verdict (held,
failed, inconclusive), none skips for the checkpoint's shape, and the verdicts are the ones
recorded in ``fixtures/real/smollm2/verdicts.json`` (the findings of README "Real models"): a
change that flips a finding on SmolLM2 shows here, and the file is updated with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechtests.core.models import ModelUnavailable, resolve

pytestmark = pytest.mark.heavy
pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
VERDICTS = ROOT / "fixtures" / "real" / "smollm2" / "verdicts.json"
# what may keep a claim from a verdict on a real model: its task cannot be written for this
# tokenizer (the organisms' synthetic languages; a family whose words are not single tokens)
TRUE_CAUSES = ("synthetic language", "cannot express", "expresses only")


@pytest.fixture(scope="module")
def smollm2_report(tmp_path_factory) -> dict:
    try:
        resolve("smollm2")
    except ModelUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("smollm2-claims")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "claims"), "--model",
                           "smollm2", "--report-dir", str(out), "-p", "no:cacheprovider", "-q",
                           ], cwd=ROOT, capture_output=True, text=True)
    runs = sorted(out.glob("run-*/report.json"))
    assert runs, f"no report written (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    return json.loads(runs[-1].read_text())


def _tests(report: dict) -> dict[str, list[dict]]:
    return {c["id"]: [t for cell in c["cells"].values() for t in cell["tests"]]
            for c in report["claims"]}


def test_no_claim_skips_for_the_checkpoint_s_shape(smollm2_report):
    for claim, tests in _tests(smollm2_report).items():
        for t in tests:
            assert "no reference of this checkpoint's shape" not in t["reason"], (claim, t)
            assert t["outcome"] != "error", (claim, t["reason"])
            if t["outcome"] == "skipped":
                assert any(c in t["reason"] for c in TRUE_CAUSES), (claim, t["reason"])


def test_every_role_cast_here_is_named_and_confirmed_on_a_disjoint_half(smollm2_report):
    for claim, tests in _tests(smollm2_report).items():
        for t in tests:
            for s in t.get("splits") or []:
                assert not set(s["discover"]) & set(s["confirm"]), (claim, s)
            if t["outcome"] == "held":
                assert all(c["found"] for c in t["casts"] if not c["expected"]), (claim, t)


def test_the_verdicts_are_the_recorded_findings(smollm2_report):
    recorded = json.loads(VERDICTS.read_text())["verdicts"]
    got = {t["nodeid"].split("::", 1)[1]: t["outcome"]
           for tests in _tests(smollm2_report).values() for t in tests}
    changed = {k: (recorded.get(k), v) for k, v in got.items() if recorded.get(k) != v}
    assert not changed, (
        f"verdicts on SmolLM2 changed (recorded, now): {changed}. If the change is meant, "
        f"record it in {VERDICTS.relative_to(ROOT)} and say why in README 'Real models'.")
