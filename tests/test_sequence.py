"""Checkpoint sequences (issue 12): --model DIR/glob ordered by step, weight hashes, the
identical-weights warning, merging reports from separate runs, xdist workers' GPUs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mechtests.core.sequence import (
    SequenceError,
    expand,
    identical_weights,
    is_sequence,
    weight_hash,
)
from mechtests.suite.plugin import worker_device
from mechtests.suite.report import MergeError, load_report, merge
from mechtests.testing import save_tiny_checkpoint

pytest_plugins = ["pytester"]


def _ckpt(path: Path, step: int | None, seed: int, **kw) -> Path:
    save_tiny_checkpoint(path, seed=seed, **kw)
    if step is not None:
        (path / "training.json").write_text(json.dumps({"step": step, "loss": 5.0 - step / 100}))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Three checkpoints whose names sort otherwise than their steps (900, 100, 50)."""
    root = tmp_path_factory.mktemp("seq") / "steps"
    for name, step, seed in (("a", 900, 1), ("b", 100, 2), ("c", 50, 3)):
        _ckpt(root / name, step, seed)
    (root / "README.txt").write_text("not a checkpoint")
    return root


# -- ordering and usage errors -------------------------------------------------------------------
def test_directory_of_checkpoints_is_ordered_by_training_step(run_dir):
    assert is_sequence(str(run_dir)) and not is_sequence(str(run_dir / "a"))
    assert [Path(s).name for s in expand(str(run_dir))] == ["c", "b", "a"]
    assert [Path(s).name for s in expand(str(run_dir / "*"))] == ["c", "b", "a"]
    assert expand(str(run_dir / "a")) == [str(run_dir / "a")]  # one checkpoint: itself


def test_step_from_the_name_orders_numerically(tmp_path):
    for n, seed in ((10, 1), (5, 2), (100, 3)):
        save_tiny_checkpoint(tmp_path / f"checkpoint-{n}", seed=seed)
    assert [Path(s).name for s in expand(str(tmp_path))] == [
        "checkpoint-5", "checkpoint-10", "checkpoint-100"]


def test_bad_sequences_are_clear_usage_errors(tmp_path, run_dir):
    with pytest.raises(SequenceError, match="glob matched nothing"):
        expand(str(tmp_path / "nothing-*"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "x1.txt").write_text("")
    with pytest.raises(SequenceError, match="none a checkpoint directory"):
        expand(str(tmp_path / "files" / "*"))
    with pytest.raises(SequenceError, match="neither a checkpoint .* nor a sequence"):
        expand(str(tmp_path / "files"))
    _ckpt(tmp_path / "unordered" / "final", None, 1)
    _ckpt(tmp_path / "unordered" / "best", None, 2)
    with pytest.raises(SequenceError, match="cannot order the sequence"):
        expand(str(tmp_path / "unordered"))
    _ckpt(tmp_path / "dup" / "x", 100, 1)
    _ckpt(tmp_path / "dup" / "y", 100, 2)
    with pytest.raises(SequenceError, match="are both step 100"):
        expand(str(tmp_path / "dup"))
    _ckpt(tmp_path / "mixed" / "s1", 1, 1)
    _ckpt(tmp_path / "mixed" / "s2", 2, 2, n_layer=3)
    with pytest.raises(SequenceError, match="3 layers x 4 heads.*2 layers x 4 heads"):
        expand(str(tmp_path / "mixed"))


# -- which weights were checked ------------------------------------------------------------------
def test_weight_hash_is_the_sha256_of_the_weight_file(run_dir):
    got = weight_hash(run_dir / "a")
    want = hashlib.sha256((run_dir / "a" / "model.safetensors").read_bytes()).hexdigest()
    assert got == {"sha256": want, "files": {"model.safetensors": want}}
    assert weight_hash(run_dir / "b")["sha256"] != want


def test_identical_weights_warn_and_different_weights_do_not(run_dir):
    info = {m: weight_hash(run_dir / m) for m in ("a", "b", "c")}
    assert identical_weights(info) == []
    info["d"] = dict(info["a"])
    (warning,) = identical_weights(info)
    assert "a, d" in warning and "identical weights" in warning


# -- the plugin and the report -------------------------------------------------------------------
CLAIM = """
import pytest

@pytest.mark.claim(id="demo.width", source="test")
def test_width(subject, record):
    record.check(subject.model.cfg.d_model, 16, what="d_model")
"""


def _report(pytester, where: str = "reports") -> dict:
    (run,) = (pytester.path / where).glob("run-*")
    return json.loads((run / "report.json").read_text())


def test_model_sequence_runs_each_checkpoint_in_step_order(pytester, run_dir):
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("--model", str(run_dir), "-v", "--report-dir", "reports")
    res.assert_outcomes(passed=3)
    data = _report(pytester)
    names = [Path(m).name for m in data["models"]]
    assert names == ["c", "b", "a"]
    assert [data["checkpoints"][m]["step"] for m in data["models"]] == [50, 100, 900]
    assert [data["checkpoints"][m]["loss"] for m in data["models"]] == [4.5, 4.0, -4.0]
    for m in data["models"]:
        digest = hashlib.sha256((Path(m) / "model.safetensors").read_bytes()).hexdigest()
        assert data["checkpoints"][m]["sha256"] == digest
    assert data["warnings"] == []
    (run,) = (pytester.path / "reports").glob("run-*")
    md = (run / "report.md").read_text()
    assert "## Checkpoints" in md and "| step | loss | outcome | d_model (≥ 16) |" in md
    assert "| 50 | 4.5 | ✓ | 32 |" in md
    assert "against training step" in (run / "report.html").read_text()


def test_identical_checkpoints_in_one_run_warn_in_terminal_and_report(pytester, run_dir,
                                                                     tmp_path):
    root = tmp_path / "run"
    shutil.copytree(run_dir / "b", root / "step-100")
    shutil.copytree(run_dir / "b", root / "step-200")  # a "later step" serving the same weights
    for step in (100, 200):
        (root / f"step-{step}" / "training.json").write_text(json.dumps({"step": step}))
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("--model", str(root), "--report-dir", "reports")
    res.assert_outcomes(passed=2)
    res.stdout.fnmatch_lines(["*mechtests WARNING: identical weights: *step-100, *step-200*"])
    data = _report(pytester)
    assert len(data["warnings"]) == 1
    (run,) = (pytester.path / "reports").glob("run-*")
    assert "**Warning:** identical weights" in (run / "report.md").read_text()
    assert "class='warn'" in (run / "report.html").read_text()


def test_empty_glob_stops_the_run_before_any_test(pytester, tmp_path):
    pytester.makepyfile(CLAIM)
    res = pytester.runpytest("--model", str(tmp_path / "nope-*"))
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*the glob matched nothing*"])


def test_reports_from_separate_runs_merge(pytester, run_dir, tmp_path):
    pytester.makepyfile(CLAIM)
    for name in ("a", "c"):  # two runs, as two SLURM array jobs would make
        pytester.runpytest("--model", str(run_dir / name), "--report-dir", f"r-{name}")
    runs = [next((pytester.path / f"r-{n}").glob("run-*")) for n in ("a", "c")]
    merged = merge(tmp_path / "merged", runs)
    data = json.loads((merged / "report.json").read_text())
    # separate runs know no sequence, but training.json gives the steps: ordered by them
    assert [Path(m).name for m in data["models"]] == ["c", "a"]
    assert [c["id"] for c in data["claims"]] == ["demo.width"]
    assert sorted(data["claims"][0]["cells"]) == sorted(data["models"])
    assert data["counts"]["held"] == 2
    assert [r["report"] for r in data["settings"]["merged_from"]] == [str(r) for r in runs]
    assert (merged / "report.html").is_file() and (merged / "report.md").is_file()
    # the same run twice: its tests would count twice
    with pytest.raises(MergeError, match="is in both"):
        merge(tmp_path / "twice", [runs[0], runs[0]])
    assert not (tmp_path / "twice").exists() or not any((tmp_path / "twice").iterdir())


def test_merge_refuses_another_version_and_a_missing_report(pytester, run_dir, tmp_path):
    pytester.makepyfile(CLAIM)
    pytester.runpytest("--model", str(run_dir / "a"), "--report-dir", "reports")
    (run,) = (pytester.path / "reports").glob("run-*")
    data = json.loads((run / "report.json").read_text())
    data["settings"]["versions"]["mechtests"] = "0.0.1"
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps(data))
    with pytest.raises(MergeError, match="written by mechtests 0.0.1 .* Re-run"):
        load_report(old)
    with pytest.raises(MergeError, match="no report.json there"):
        load_report(tmp_path / "nowhere")


# -- pytest-xdist workers on GPUs -----------------------------------------------------------------
@pytest.mark.parametrize(("device", "worker", "n_gpus", "want"), [
    (None, "gw0", 4, "cuda:0"),
    (None, "gw5", 4, "cuda:1"),      # worker i on cuda:i mod n
    ("cuda", "gw3", 2, "cuda:1"),
    (None, "gw3", 0, None),          # no GPU: the default (cpu) stays
    ("cpu", "gw1", 4, "cpu"),        # an explicit device is kept
    ("cuda:2", "gw1", 4, "cuda:2"),
    (None, None, 4, None),           # not under xdist
    (None, "master", 4, None),
])
def test_xdist_worker_takes_one_gpu(device, worker, n_gpus, want):
    assert worker_device(device, worker, n_gpus) == want


# -- the training recipe saves the sequence ------------------------------------------------------
def test_save_every_writes_ordinary_checkpoints_and_leaves_training_unchanged(tmp_path):
    from mechtests.core.models import check_checkpoint
    from mechtests.organisms.train import run

    run(["induction", "--out", str(tmp_path / "plain"), "--steps", "4"])
    run(["induction", "--out", str(tmp_path / "saved"), "--steps", "4", "--save-every", "2"])
    steps = tmp_path / "saved" / "steps"
    assert [Path(s).name for s in expand(str(steps))] == [
        "step-000000", "step-000002", "step-000004"]
    for d in steps.iterdir():
        check_checkpoint(d)  # config, safetensors, tokenizer: an ordinary HF checkpoint
        info = json.loads((d / "training.json").read_text())
        assert info["step"] == int(d.name[5:]) and info["loss"] > 0
        assert info["command"].endswith("--save-every 2")
    # saving touches no random state: the last step is the plain run's checkpoint, byte for byte
    final = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert (steps / "step-000004" / "model.safetensors").read_bytes() == final
    assert (steps / "step-000002" / "model.safetensors").read_bytes() != final
    # step 0 is the initialisation itself (no update yet): the recipe's seeded init
    import torch
    from safetensors.torch import load_file

    from mechtests.organisms.train import RECIPES, make_model, vocab

    torch.manual_seed(RECIPES["induction"].seed)
    init = make_model(RECIPES["induction"], len(vocab("induction"))).state_dict()
    saved = load_file(steps / "step-000000" / "model.safetensors")
    assert saved and all(torch.equal(saved[k], init[k]) for k in saved)


# -- Ray: each checkpoint one task, one merged report ----------------------------------------------
SHIPPED = Path(__file__).resolve().parent.parent / "fixtures" / "checkpoints" / "induction-steps"


@pytest.mark.heavy
def test_ray_runs_each_checkpoint_as_a_task_and_merges(tmp_path):
    """A real local Ray cluster, three shipped checkpoints, one claim file: the merged report
    has each checkpoint's outcome and values, equal to a plain pytest run on that checkpoint."""
    pytest.importorskip("ray", reason="Ray is the optional extra: pip install -e '.[cluster]'")
    from mechtests.suite.cluster import run, run_checkpoint

    root = Path(__file__).resolve().parent.parent
    picked = [SHIPPED / f"step-{s:06d}" for s in (0, 600, 1200)]
    args = ["claims/test_induction.py", "-k", "some_head_does_induction"]
    written, done = run([str(p) for p in picked], args, tmp_path / "out", num_cpus=2, cwd=root)
    assert written is not None, [d["tail"] for d in done]
    assert all(d["report"] is not None for d in done)
    data = json.loads((written / "report.json").read_text())
    assert data["models"] == [str(p) for p in picked]
    assert [data["checkpoints"][str(p)]["step"] for p in picked] == [0, 600, 1200]
    (claim,) = [c for c in data["claims"] if c["id"] == "induction.exists"]
    # the same numbers as an ordinary run on one checkpoint (here, not through Ray)
    alone = run_checkpoint(str(picked[2]), args, str(root))["report"]
    (ref,) = [c for c in alone["claims"] if c["id"] == "induction.exists"]
    cell, ref_cell = claim["cells"][str(picked[2])], ref["cells"][str(picked[2])]
    assert cell["outcome"] == ref_cell["outcome"] == "held"
    got = [m["value"] for t in cell["tests"] for m in t["measurements"]]
    assert got and got == [m["value"] for t in ref_cell["tests"] for m in t["measurements"]]
    # at initialisation no induction head exists: the claim fails there
    assert claim["cells"][str(picked[0])]["outcome"] == "failed"
    assert data["settings"]["ray"]["tasks"] == 3
