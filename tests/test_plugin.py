"""The pytest plugin as a user meets it: options, the claim marker, subjects and skips."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CLAIM = """
import pytest

@pytest.mark.claim(id="demo", source="test", subjects=["gpt2"])
def test_needs_gpt2(subject):
    assert subject.model is not None

@pytest.mark.claim(id="demo2", source="test", subjects=["gpt2"])
@pytest.mark.parametrize("family", ["a", "b", "c"])
def test_many(subject, family):
    assert subject.model is not None
"""


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_missing_model_skips_once_with_how_to(pytester, offline):
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("-ra", "--strict-markers")
    res.assert_outcomes(skipped=4)
    out = res.stdout.str()
    # one grouped skip line for the model (not one per test), naming the fix with the hub
    # client's real command, and one line in mechtests' summary; no traceback
    assert out.count("hf download gpt2") == 2 and "huggingface-cli" not in out
    assert "SKIPPED [4] model gpt2:" in out
    assert "model gpt2: 4 claim tests skipped." in out
    assert "Traceback" not in out


def test_model_option_replaces_subjects(pytester, tiny_model_dir):
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("--model", str(tiny_model_dir), "-v")
    res.assert_outcomes(passed=4)
    res.stdout.fnmatch_lines([f"*test_needs_gpt2?{tiny_model_dir}?*PASSED*"])


def test_repeated_model_option_parametrizes(pytester, tiny_model_dir, offline):
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("--model", str(tiny_model_dir), "--model", "gpt2")
    res.assert_outcomes(passed=4, skipped=4)


def test_claim_marker_is_registered(pytester):
    res = pytester.runpytest("--markers")
    res.stdout.fnmatch_lines(["*@pytest.mark.claim(id, source, subjects=None, kind=*"])


def test_subject_without_subjects_is_a_usage_error(pytester):
    pytester.makepyfile("def test_x(subject):\n    pass\n")
    res = pytester.runpytest()
    assert res.ret != 0
    res.stdout.fnmatch_lines(["*names no subjects*no --model*"])


def test_options_in_help(pytester):
    res = pytester.runpytest("--help")
    res.stdout.fnmatch_lines(["*--model=SPEC*", "*--device=DEVICE*", "*--dtype=*"])
