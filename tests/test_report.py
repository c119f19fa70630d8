"""The claims report: what it says, and that it is written whole, once per finished run, or not."""

from __future__ import annotations

import json

import pytest

from mechtests import report as rep
from mechtests.report import TestResult, build, render_md, write_report

pytest_plugins = ["pytester"]

SETTINGS = {"date": "2026-11-21T15:30:00+00:00", "models": ["gpt2", "tiny"], "seed": 0,
            "versions": {"torch": "2.13.0"}, "command": "pytest claims/"}
HEAT = {"title": "head attribution", "result": {
    "name": "head attribution", "axes": ["layer", "head"],
    "labels": {"layer": ["0", "1"], "head": ["0", "1"]}, "values": [[0.1, -0.2], [0.9, 0.0]],
    "meta": {}}}


def results() -> list[TestResult]:
    held = {"what": "score", "value": 0.82, "threshold": 0.5, "op": ">=", "held": True}
    low = {"what": "score", "value": 0.31, "threshold": 0.5, "op": ">=", "held": False}
    return [
        TestResult("c.py::test_nm[gpt2]", "ioi.name_movers", "Wang et al. 2022", "gpt2", "held",
                   measurements=[held], heatmaps=[HEAT]),
        TestResult("c.py::test_nm[tiny]", "ioi.name_movers", "Wang et al. 2022", "tiny", "failed",
                   reason="AssertionError: score = 0.31", measurements=[low], heatmaps=[HEAT]),
        TestResult("c.py::test_ind[gpt2]", "induction", "", "gpt2", "skipped",
                   reason="gpt2 weights are not on this machine"),
        TestResult("c.py::test_ind[tiny]", "induction", "", "tiny", "held"),
    ]


def test_table_has_one_cell_per_claim_and_checkpoint():
    data = build(results(), SETTINGS)
    assert data["models"] == ["gpt2", "tiny"]
    cells = {c["id"]: {m: (x["outcome"], x["text"]) for m, x in c["cells"].items()}
             for c in data["claims"]}
    assert cells == {
        "induction": {"gpt2": ("skipped", "gpt2 weights are not on this machine"),
                      "tiny": ("held", "")},
        "ioi.name_movers": {"gpt2": ("held", "score 0.82 (needs >= 0.5)"),
                            "tiny": ("failed", "score 0.31 (needs >= 0.5)")},
    }
    assert data["counts"]["held"] == 2 and data["counts"]["failed"] == 1
    md = render_md(data)
    assert "| claim | gpt2 | tiny |" in md
    assert ("| ioi.name_movers | held: score 0.82 (needs >= 0.5) | failed: score 0.31 "
            "(needs >= 0.5) |") in md
    assert "| induction | skipped: gpt2 weights are not on this machine | held |" in md


def test_several_tests_in_one_cell_show_the_worst_and_the_counts():
    a = TestResult("c.py::test_a[tiny]", "x", model="tiny", outcome="held")
    b = TestResult("c.py::test_b[tiny]", "x", model="tiny", outcome="error", reason="setup: boom")
    cell = build([a, b], {"models": ["tiny"]})["claims"][0]["cells"]["tiny"]
    assert cell["outcome"] == "error" and cell["text"] == "setup: boom; (1 error, 1 held)"


def test_write_report_makes_a_new_complete_directory_each_time(tmp_path):
    first = write_report(results(), SETTINGS, tmp_path)
    second = write_report(results(), SETTINGS, tmp_path)
    assert (first.name, second.name) == ("run-20261121-153000", "run-20261121-153000-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name]
    assert sorted(p.name for p in first.iterdir()) == ["images", "report.html", "report.json",
                                                       "report.md"]
    assert len(list((first / "images").glob("*.png"))) == 2  # the heatmap, for gpt2 and tiny
    data = json.loads((first / "report.json").read_text())
    assert data["claims"][1]["cells"]["tiny"]["outcome"] == "failed"
    page = (first / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2 and "src='images/" not in page
    md = (first / "report.md").read_text()
    assert "| head attribution | ![gpt2](images/ioi.name_movers--gpt2--head_attribution.png) |" \
           in md


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, error):
    earlier = write_report(results(), SETTINGS, tmp_path)

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(rep, "render_html", broken)
    with pytest.raises(type(error)):
        write_report(results(), SETTINGS, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [earlier.name]  # no partial dir, earlier kept


# -- whole sessions ------------------------------------------------------------------------------
CLAIMS = '''
import os
import pytest
import torch
from mechtests.result import Result


@pytest.fixture
def loaded(model):
    if model == "gpt2":
        pytest.skip("gpt2 weights are not on this machine")
    return model


@pytest.mark.claim(id="ioi.name_movers", source="Wang et al. 2022")
@pytest.mark.parametrize("model", ["tiny", "big"])
def test_name_movers(loaded, model, record):
    score = {"tiny": 0.82, "big": 0.31}[model]
    record.heatmap(Result("head attribution", ("layer", "head"),
                          {"layer": ["0", "1"], "head": ["0", "1"]}, torch.eye(2) * score))
    record.check(score, 0.5, op=">=", what="name-mover score")


@pytest.mark.claim(id="induction")
@pytest.mark.parametrize("model", ["tiny", "gpt2"])
def test_induction(loaded, model, record):
    if os.environ.get("INTERRUPT_INNER"):
        raise KeyboardInterrupt
    record.measured(0.9, 0.5)


def test_not_a_claim():
    pass
'''


def run_claims(pytester: pytest.Pytester, *args: str, **kwargs):
    pytester.makepyfile(test_claims=CLAIMS)
    # hypothesis's terminal summary costs ~2 s per inner session here: leave it out
    return pytester.runpytest_inprocess("-p", "mechtests.report", "-p", "no:cacheprovider",
                                        "-p", "no:hypothesispytest",
                                        "--report-dir", "out", *args, **kwargs)


def runs(pytester: pytest.Pytester) -> list[str]:
    out = pytester.path / "out"
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def check_report(run_dir) -> None:
    data = json.loads((run_dir / "report.json").read_text())
    cells = {c["id"]: {m: (x["outcome"], x["text"]) for m, x in c["cells"].items()}
             for c in data["claims"]}
    assert cells == {
        "induction": {"tiny": ("held", "0.9 (needs >= 0.5)"),
                      "gpt2": ("skipped", "gpt2 weights are not on this machine")},
        "ioi.name_movers": {"tiny": ("held", "name-mover score 0.82 (needs >= 0.5)"),
                            "big": ("failed", "name-mover score 0.31 (needs >= 0.5)")},
    }
    assert data["claims"][1]["source"] == "Wang et al. 2022"
    assert set(data["settings"]) >= {"date", "command", "models", "device", "seed", "versions"}
    assert data["settings"]["versions"]["torch"] and data["settings"]["versions"]["mechtests"]
    assert len(list((run_dir / "images").glob("*.png"))) == 2
    md = (run_dir / "report.md").read_text()
    assert "| claim | big | gpt2 | tiny |" in md
    assert "| induction | n/a | skipped: gpt2 weights are not on this machine | held: 0.9" in md
    assert (run_dir / "report.html").read_text().count("data:image/png;base64,") == 2


def test_a_claims_run_writes_one_report_and_keeps_earlier_ones(pytester):
    out = run_claims(pytester)
    out.assert_outcomes(passed=3, failed=1, skipped=1)
    assert len(runs(pytester)) == 1 and "mechtests report: " in out.stdout.str()
    check_report(pytester.path / "out" / runs(pytester)[0])
    run_claims(pytester)
    assert len(runs(pytester)) == 2


def test_the_report_crosses_xdist_workers(pytester):
    out = run_claims(pytester, "-n", "2")
    out.assert_outcomes(passed=3, failed=1, skipped=1)
    (name,) = runs(pytester)
    check_report(pytester.path / "out" / name)


@pytest.mark.parametrize("args", [["--no-report"], ["-k", "not_a_claim"], ["-x"]])
def test_nothing_is_written_without_claims_or_when_stopped_early(pytester, args):
    run_claims(pytester, *args)
    assert runs(pytester) == []


def test_an_interrupted_run_writes_nothing(pytester, monkeypatch):
    monkeypatch.setenv("INTERRUPT_INNER", "1")
    out = run_claims(pytester, no_reraise_ctrlc=True)
    assert out.ret == pytest.ExitCode.INTERRUPTED
    assert runs(pytester) == []
    assert "no report written" in out.stdout.str()


# -- progress bars ---------------------------------------------------------------------------------
def test_progress_is_quiet_on_ci_and_under_capture_and_can_be_forced(monkeypatch, capsys):
    from mechtests.progress import progress, quiet

    monkeypatch.delenv("MECHTESTS_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert quiet()  # pytest captures stderr: not a terminal
    monkeypatch.setenv("CI", "true")
    assert list(progress(range(3), "sweep")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MECHTESTS_PROGRESS", "1")
    assert list(progress(range(3), "sweep", total=3)) == [0, 1, 2]
    assert "sweep" in capsys.readouterr().err
