"""Five outcomes kept apart: held, failed (the claim's assertion), error (any other exception),
inconclusive (the effect too small to judge), skipped (with the true reason), in the terminal,
the report's JSON, Markdown and HTML."""

from __future__ import annotations

import json

import pytest

from mechtests.suite.report import TestResult, build

pytest_plugins = ["pytester"]

CLAIMS = """
import pytest
from mechtests.suite.claims import effect_size, holds

@pytest.mark.claim(id="held", source="test", subjects=["tiny"])
def test_held(subject, record):
    holds(2.0, ">=", 1.0, "score", "why one", record)

@pytest.mark.claim(id="failed", source="test", subjects=["tiny"])
def test_failed(subject, record):
    holds(0.5, ">=", 1.0, "score", "a score of one means the mechanism is there", record)

@pytest.mark.claim(id="crash", source="test", subjects=["tiny"])
def test_crash(subject, record):
    holds(2.0, ">=", 1.0, "score", "why one", record)
    subject.model.no_such_attribute

@pytest.mark.claim(id="small", source="test", subjects=["tiny"])
def test_small(subject, record):
    effect_size(0.3, 0.1, "clean minus corrupted logit diff", record)
    holds(2.0, ">=", 1.0, "score", "why one", record)

@pytest.mark.claim(id="absent", source="test", subjects=["gpt2"])
@pytest.mark.parametrize("k", range(5))
def test_absent(subject, k):
    pass
"""


@pytest.fixture
def run(pytester, tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytester.makepyfile(CLAIMS.replace('["tiny"]', repr([str(tiny_model_dir)])))
    res = pytester.runpytest("--report-dir", "out", "-p", "no:cacheprovider", "-rA")
    data = json.loads(next(pytester.path.glob("out/run-*/report.json")).read_text())
    md = next(pytester.path.glob("out/run-*/report.md")).read_text()
    page = next(pytester.path.glob("out/run-*/report.html")).read_text()
    return res, data, md, page


def cells(data):
    return {c["id"]: next(iter(c["cells"].values())) for c in data["claims"]}


def test_terminal_keeps_the_outcomes_apart(run):
    res, *_ = run
    out = res.stdout.str()
    assert "mechtests claims: 1 held, 1 failed, 1 error, 1 inconclusive, 5 skipped" in out
    res.stdout.fnmatch_lines(["*1 failed, 1 passed, 5 skipped*1 error, 1 inconclusive*"])
    assert "ERROR at call of test_crash" in out  # a crash is not a failed claim
    assert "INCONCLUSIVE test_" in out and "::test_small" in out and "gap 0.2 < 1" in out


def test_a_crash_is_an_error_everywhere(run):
    _, data, md, page = run
    crash = cells(data)["crash"]
    assert crash["outcome"] == "error"
    # the cell says why it errored, not the measurement that held before the crash
    assert "AttributeError" in crash["text"] and "score" not in crash["text"]
    assert "| [crash](#crash) | ⚠ AttributeError |" in md
    assert "⚠ **crash** on `model`: AttributeError" in md
    assert "class='c error'" in page and "<b>AttributeError</b>" in page
    assert data["counts"]["error"] == 1 and data["counts"]["failed"] == 1


def test_inconclusive_is_never_held(run):
    res, data, md, _ = run
    small = cells(data)["small"]
    assert small["outcome"] == "inconclusive" and "gap 0.2" in small["text"]
    test = small["tests"][0]
    assert test["measurements"][0]["kind"] == "sanity"
    assert "| [small](#small) | ? 0.2 (≥ 1) |" in md
    assert "? **small** on `model`: effect size" in md
    assert res.ret == 1  # the failed and the error; inconclusive alone does not fail a run


def test_a_missing_model_is_one_note_not_one_per_test(run):
    res, data, *_ = run
    out = res.stdout.str()
    assert out.count("hf download gpt2") == 2  # the summary line, and -r's one grouped line
    assert "huggingface-cli" not in out
    assert data["notes"] == [{"model": "gpt2", "note": data["notes"][0]["note"], "tests": 5}]
    assert cells(data)["absent"]["text"].startswith("the model's weights are not on this")


def test_failure_names_value_threshold_and_why_without_model_repr(run):
    res, *_ = run
    out = res.stdout.str()
    assert ("score: measured 0.5, claim needs >= 1 (a score of one means the mechanism is "
            "there)") in out
    failure = out[out.index("__ test_failed"):out.index("mechtests claims:")]
    assert "TransformerBridge(" not in failure and "def holds" not in failure  # frames hidden
    assert "Subject(" in failure and "2 layers x 4 heads" in failure


def test_a_cell_that_failed_for_another_reason_shows_that_reason():
    held = {"what": "score", "value": 2.0, "threshold": 1.0, "op": ">=", "held": True,
            "kind": "evidence"}
    drift = TestResult("c.py::t[m]", "c", model="m", outcome="failed", measurements=[held],
                       reason="AssertionError: heatmap 'x' differs from its snapshot")
    cell = build([drift], {"models": ["m"]})["claims"][0]["cells"]["m"]
    assert cell["text"] == "AssertionError: heatmap 'x' differs from its snapshot"
    sanity = dict(held, what="by construction", kind="sanity")
    ok = TestResult("c.py::t[m]", "c", model="m", outcome="held", measurements=[sanity, held])
    assert ok.summary() == "score 2 (needs >= 1)"
