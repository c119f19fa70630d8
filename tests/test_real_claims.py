"""Every claim on the real pretrained models: SmolLM2-135M (``--model smollm2``) and Gemma 3
270M (``--model gemma3-270m``), models no claim has a reference for. Each claim whose task the
model's tokenizer can express reaches a verdict (held, failed, inconclusive), none skips for
the checkpoint's shape or because the engine refuses a view (Gemma 3's post-norms), and the
verdicts are the ones recorded in ``fixtures/real/<model>/verdicts.json`` (the findings of
README "Real models" and "Across real models"): a change that flips a finding shows here, and
the file is updated with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechtests.core.models import ModelUnavailable, resolve

pytestmark = pytest.mark.heavy
pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
REAL = ("smollm2", "gemma3-270m")
# what may keep a claim from a verdict on a real model: its task cannot be written for this
# tokenizer (the organisms' synthetic languages; a family whose words are not single tokens)
TRUE_CAUSES = ("synthetic language", "cannot express", "expresses only")


def _verdicts(name: str) -> Path:
    return ROOT / "fixtures" / "real" / name / "verdicts.json"


@pytest.fixture(scope="module", params=REAL)
def real_report(request, tmp_path_factory) -> dict:
    name = request.param
    try:
        resolve(name)
    except ModelUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp(f"{name}-claims")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "claims"), "--model",
                           name, "--report-dir", str(out), "-p", "no:cacheprovider", "-q",
                           ], cwd=ROOT, capture_output=True, text=True)
    runs = sorted(out.glob("run-*/report.json"))
    assert runs, f"no report written (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    return {**json.loads(runs[-1].read_text()), "subject": name}


def _tests(report: dict) -> dict[str, list[dict]]:
    return {c["id"]: [t for cell in c["cells"].values() for t in cell["tests"]]
            for c in report["claims"]}


def test_no_claim_skips_for_the_checkpoint_s_shape(real_report):
    for claim, tests in _tests(real_report).items():
        for t in tests:
            assert "no reference of this checkpoint's shape" not in t["reason"], (claim, t)
            assert "unsupported architecture" not in t["reason"], (claim, t["reason"])
            assert t["outcome"] != "error", (claim, t["reason"])
            if t["outcome"] == "skipped":
                assert any(c in t["reason"] for c in TRUE_CAUSES), (claim, t["reason"])


def test_every_role_cast_here_is_named_and_confirmed_on_a_disjoint_half(real_report):
    for claim, tests in _tests(real_report).items():
        for t in tests:
            for s in t.get("splits") or []:
                assert not set(s["discover"]) & set(s["confirm"]), (claim, s)
            if t["outcome"] == "held":
                assert all(c["found"] for c in t["casts"] if not c["expected"]), (claim, t)


def test_the_verdicts_are_the_recorded_findings(real_report):
    path = _verdicts(real_report["subject"])
    recorded = json.loads(path.read_text())["verdicts"]
    got = {t["nodeid"].split("::", 1)[1]: t["outcome"]
           for tests in _tests(real_report).values() for t in tests}
    changed = {k: (recorded.get(k), v) for k, v in got.items() if recorded.get(k) != v}
    assert not changed, (
        f"verdicts on {real_report['subject']} changed (recorded, now): {changed}. If the "
        f"change is meant, record it in {path.relative_to(ROOT)} and say why in README "
        "'Real models'.")
