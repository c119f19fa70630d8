"""Writing the claims report: whole or not at all, never over another run's, never silently lost.

(What the report says is tests/test_report.py; this file is the write path, issue 10.)
"""

from __future__ import annotations

import errno
import os

import pytest

from mechtests.suite import report as rep
from mechtests.suite.report import TestResult, write_report

pytest_plugins = ["pytester"]

SETTINGS = {"date": "2026-11-21T15:30:00+00:00", "models": ["tiny"], "command": "pytest claims/"}

CLAIM = '''
import os
import pytest

@pytest.mark.claim(id="demo")
@pytest.mark.parametrize("model", ["tiny", "big"])
def test_demo(model, record):
    if model == "big" and os.environ.get("INTERRUPT_INNER"):
        raise KeyboardInterrupt
    record.measured(0.9, 0.5)
'''


def results() -> list[TestResult]:
    return [TestResult("c.py::test_x[tiny]", "x", model="tiny", outcome="held")]


def entries(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def run_claims(pytester: pytest.Pytester, *args: str, conftest: str = ""):
    pytester.makepyfile(test_claims=CLAIM)
    if conftest:
        pytester.makeconftest(conftest)
    return pytester.runpytest_inprocess("-p", "mechtests.suite.report", "-p", "no:cacheprovider",
                                        "-p", "no:hypothesispytest", "--report-dir", "out",
                                        *args, no_reraise_ctrlc=True)


# -- the rename --------------------------------------------------------------------------------
@pytest.mark.parametrize("taken_as", ["a full directory", "a file"])
def test_a_name_taken_between_the_check_and_the_rename_moves_on(tmp_path, monkeypatch, taken_as):
    """Another run takes run-<stamp> after the existence check: ENOTEMPTY (or EEXIST) from the
    rename must not lose this report, nor touch the other run's."""
    real_rename = os.rename
    raced = []

    def racing_rename(src, dst):
        if not raced:  # the other run wins the race for the first name
            raced.append(dst)
            if taken_as == "a file":
                open(dst, "w").write("theirs")
            else:
                os.mkdir(dst)
                open(os.path.join(dst, "report.md"), "w").write("theirs")
        return real_rename(src, dst)

    monkeypatch.setattr(rep.os, "rename", racing_rename)
    final = write_report(results(), SETTINGS, tmp_path)
    assert final.name == "run-20261121-153000-2"
    assert (final / "report.md").is_file() and (final / "report.json").is_file()
    other = tmp_path / "run-20261121-153000"
    assert (other.read_text() if taken_as == "a file" else (other / "report.md").read_text()) \
        == "theirs"
    assert entries(tmp_path) == ["run-20261121-153000", "run-20261121-153000-2"]


def test_an_unexpected_rename_error_still_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing_rename(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(rep.os, "rename", failing_rename)
    with pytest.raises(OSError, match="cross-device"):
        write_report(results(), SETTINGS, tmp_path)
    assert entries(tmp_path) == []


def test_ctrl_c_at_the_rename_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(rep.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(results(), SETTINGS, tmp_path)
    assert entries(tmp_path) == []


def test_report_directory_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        final = write_report(results(), SETTINGS, tmp_path)
    finally:
        os.umask(old)
    assert final.stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0700
    assert (final / "images").stat().st_mode & 0o777 == 0o755
    assert (final / "report.md").stat().st_mode & 0o777 == 0o644


# -- the session ---------------------------------------------------------------------------------
def test_a_report_that_cannot_be_written_fails_the_run_saying_how_to_fix_it(pytester):
    (pytester.path / "out").write_text("a file where the report directory should be")
    out = run_claims(pytester)
    out.assert_outcomes(passed=2)
    assert out.ret == pytest.ExitCode.INTERNAL_ERROR
    text = out.stdout.str()
    assert "mechtests: report NOT written: FileExistsError" in text
    assert "--report-dir DIR" in text and "--no-report" in text
    assert (pytester.path / "out").read_text().startswith("a file")
    # the control: with a usable directory the same run exits 0 and writes one report
    (pytester.path / "out").unlink()
    out = run_claims(pytester)
    assert out.ret == pytest.ExitCode.OK and len(entries(pytester.path / "out")) == 1


def test_ctrl_c_while_writing_the_report_is_a_message_not_a_traceback(pytester):
    conftest = '''
import mechtests.suite.report as rep

def pytest_configure(config):
    real = rep._publish

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    rep._publish = interrupted
    config.add_cleanup(lambda: setattr(rep, "_publish", real))
'''
    out = run_claims(pytester, conftest=conftest)
    assert out.ret == pytest.ExitCode.INTERRUPTED
    text = out.stdout.str() + out.stderr.str()
    assert "mechtests: interrupted while writing the report: nothing written" in text
    assert "Traceback" not in text
    assert entries(pytester.path / "out") == []


def test_an_interrupted_run_is_not_reported_as_complete_when_the_interrupt_handler_fails(
        pytester, monkeypatch):
    """pytest's own KeyboardInterrupt handling fails (a plugin's hook raises): the exit status
    passed to sessionfinish stays 0, but the test loop never finished, so nothing is written."""
    monkeypatch.setenv("INTERRUPT_INNER", "1")
    conftest = '''
def pytest_keyboard_interrupt(excinfo):
    raise RuntimeError("a plugin's interrupt handler is broken")
'''
    out = run_claims(pytester, conftest=conftest)
    assert out.ret != pytest.ExitCode.OK
    assert entries(pytester.path / "out") == []
    assert "run interrupted or stopped early: no report written" in out.stdout.str()
