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
    res = pytester.runpytest("--model", str(tiny_model_dir), "--model", "gpt2",
                             "--allow-missing-models")
    res.assert_outcomes(passed=4, skipped=4)


# -- what a careless user types (issue 10) ---------------------------------------------------
def test_missing_model_on_the_command_line_is_an_error_naming_the_opt_out(pytester, offline,
                                                                           tiny_model_dir):
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("--model", str(tiny_model_dir), "--model", "gpt2")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*model 'gpt2': weights are not on this machine*"
                              "hf download gpt2*--allow-missing-models*"])
    assert " passed" not in res.stdout.str()  # nothing ran


def test_typo_is_an_error_with_a_suggestion_not_a_green_run_of_skips(pytester, offline):
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("--model", "inductoin")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*model 'inductoin'*Did you mean 'induction'?*"
                              "--allow-missing-models*"])
    (pytester.path / "ckpts" / "finetune").mkdir(parents=True)
    for typo in ("ckpts/fintune", "./ckpts/fintune"):  # hub-name-shaped, and path-shaped
        res = pytester.runpytest("--model", typo)
        assert res.ret == pytest.ExitCode.USAGE_ERROR
        res.stderr.fnmatch_lines([f"*model '{typo}'*Did you mean '*ckpts/finetune'?*"])
    # asked for: the run goes on, its claims skip saying why
    res = pytester.runpytest("--model", "inductoin", "--allow-missing-models", "-ra")
    res.assert_outcomes(skipped=4)
    assert "Did you mean 'induction'?" in res.stdout.str()


def test_same_model_twice_runs_once(pytester, tiny_model_dir):
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("--model", str(tiny_model_dir), "--model", str(tiny_model_dir),
                             "--model", f"{tiny_model_dir}/", "-v")
    res.assert_outcomes(passed=4)
    assert "0]" not in res.stdout.str() and "1]" not in res.stdout.str()  # no model0/model1 ids


def test_broken_checkpoint_reported_once_in_full_then_one_line(pytester, tiny_model_dir,
                                                               tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "diverged"
    shutil.copytree(tiny_model_dir, d)
    sd = load_file(d / "model.safetensors")
    sd["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    pytester.makepyfile(CLAIM)
    # -rN: no short summary (under CI=true pytest prints its messages in full, a second copy)
    res = pytester.runpytest("--model", str(d), "-p", "no:mechtests-report-plugin", "-rN")
    res.assert_outcomes(errors=4)
    out = res.stdout.str()
    assert "Traceback" not in out and "load_model" not in out
    assert out.count("weight transformer.h.0.mlp.c_fc.weight has 1 NaN") == 4  # 1 full, 3 lines
    assert out.count("could not be loaded (in full at test_broken_checkpoint") == 3
    assert len(out.splitlines()) < 80


def test_broken_checkpoint_files_stop_the_run_before_any_test(pytester, tiny_model_dir,
                                                              tmp_path):
    import shutil

    d = tmp_path / "nocfg"
    shutil.copytree(tiny_model_dir, d)
    (d / "config.json").unlink()
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("--model", str(d), "--allow-missing-models")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*missing config.json*"])


@pytest.mark.parametrize("seed", [str(2**80), "-1", "abc"])
def test_seed_out_of_range_is_a_clear_error(pytester, seed):
    pytester.makepyfile("def test_x():\n    pass\n")
    res = pytester.runpytest("--seed", seed)
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*argument --seed:*"])
    assert "Traceback" not in res.stderr.str()
    if seed != "abc":
        res.stderr.fnmatch_lines(["*out of range: a seed is 0..18446744073709551615*"])


def test_largest_seed_runs(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    pytester.runpytest("--seed", str(2**64 - 1)).assert_outcomes(passed=1)


def test_cuda_without_gpu_is_a_usage_error_not_a_checkpoint_error(pytester, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("--model", str(tiny_model_dir), "--device", "cuda")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--device cuda: no CUDA GPU is available on this machine*"])
    assert "checkpoint" not in res.stderr.str()


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
    res.stdout.fnmatch_lines(["*--model=SPEC*", "*--device=DEVICE*", "*--dtype=*",
                              "*--allow-missing-models*"])
