"""Heatmap snapshots: tolerance, messages, --snapshot-update, and models that did not run here."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from mechtests.core.result import Result
from mechtests.suite.snapshot import HeatmapExtension, compare, dumps, loads, model_of, within

pytest_plugins = ["pytester"]

LABELS = {"layer": ["0", "1"], "pos": ["0 <bos>", "1 Mary", "2 John"]}

INNER = '''
import pytest
import torch
from mechtests.core.result import Result
from mechtests.suite.snapshot import within

MODELS = {models!r}
SKIP = {skip!r}
FAIL = {fail!r}  # "before"/"after" pin: [models]; "interrupt": [models] (Ctrl-C in the test)
DELTA = {delta!r}  # model -> [(layer, pos, added)]
ATOL = {atol!r}


def sweep(model):
    vals = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 10 + (model == "gpt2")
    for i, j, d in DELTA.get(model, []):
        vals[i, j] += d
    return Result("resid sweep", ("layer", "pos"),
                  {{"layer": ["0", "1"], "pos": ["0 <bos>", "1 Mary", "2 John"]}}, vals)


@pytest.fixture
def loaded(model):
    if model in SKIP:
        pytest.skip(model + " weights are not on this machine")
    return model


@pytest.mark.parametrize("model", MODELS)
def test_claim(loaded, model, heatmap_snapshot):
    if model in FAIL.get("interrupt", []):
        raise KeyboardInterrupt
    assert model not in FAIL.get("before", []), "the claim failed"
    assert heatmap_snapshot(name="sweep") == within(sweep(model), atol=ATOL)
    assert model not in FAIL.get("after", []), "failed after pin"


def test_unrelated():
    pass
{extra}
'''

EXTRA = '''
@pytest.mark.parametrize("model", ["tiny"])
def test_dropped_later(model, heatmap_snapshot):
    assert heatmap_snapshot(name="other") == sweep(model)
'''


def run(pytester: pytest.Pytester, *args: str, models=("tiny", "gpt2"), skip=(), delta=None,
        atol=1e-3, extra: str = "", fail=None):
    pytester.makepyfile(test_claims=INNER.format(models=list(models), skip=list(skip),
                                                 delta=delta or {}, atol=atol, extra=extra,
                                                 fail=fail or {}))
    # hypothesis's terminal summary costs ~2 s per inner session here: leave it out
    return pytester.runpytest_inprocess("-p", "mechtests.suite.snapshot", "-p", "no:cacheprovider",
                                        "-p", "no:hypothesispytest",
                                        *args, no_reraise_ctrlc=True)


def snap_file(pytester: pytest.Pytester, model: str, test: str = "test_claim",
              name: str = "sweep"):
    return pytester.path / "__heatmaps__" / "test_claims" / f"{test}[{model}][{name}].heatmap.txt"


def result(vals: torch.Tensor, labels=LABELS) -> Result:
    return Result("r", ("layer", "pos"), labels, vals)


# -- the file format and the comparison, directly --------------------------------------------------
def test_text_format_is_reviewable_json_one_row_per_line():
    r = result(torch.tensor([[0.1, 0.25, -1.5], [float("nan"), 2.0, 1e-7]]))
    text = dumps(r, model="gpt2")
    assert '  "pos": ["0 <bos>", "1 Mary", "2 John"]' in text
    assert "  [0.1, 0.25, -1.5]," in text and "[NaN, 2, 1e-07]" in text
    back = loads(text)
    assert back["model"] == "gpt2" and back["labels"] == LABELS and back["values"][0][1] == 0.25
    one_d = dumps(Result("v", ("head",), {"head": ["0", "1"]}, torch.tensor([1.0, 2.0])))
    assert "\n  1,\n  2\n" in one_d  # a vector: one value per line


def test_compare_tolerance_names_cells_and_labels():
    base = torch.tensor([[0.0, 0.1, 0.2], [0.3, 0.4, 0.5]])
    exp = loads(dumps(result(base)))
    assert compare(loads(dumps(result(base + 9e-4))), exp, atol=1e-3, rtol=0) == []
    moved = base.clone()
    moved[1, 2] += 0.05
    moved[0, 0] -= 0.002
    msg = "\n".join(compare(loads(dumps(result(moved))), exp, atol=1e-3, rtol=0))
    assert "2 of 6 cells differ by more than atol=0.001" in msg
    assert "max abs diff 0.05 at layer='1', pos='2 John'" in msg
    assert "layer='1', pos='2 John': expected 0.5, actual 0.55 (diff +0.05)" in msg
    assert "layer='0', pos='0 <bos>': expected 0, actual -0.002" in msg
    # rtol scales with |expected|: 0.05 off 0.5 is within rtol=0.2
    assert compare(loads(dumps(result(moved))), exp, atol=3e-3, rtol=0.2) == []
    # NaN never matches, not even NaN (issue 10: NaN == NaN hid a broken measurement)
    nan = base.clone()
    nan[0, 1] = float("nan")
    assert "1 of 6 cells" in compare(loads(dumps(result(nan))), loads(dumps(result(nan))), 1e-3,
                                     0)[0]
    assert "1 of 6 cells" in compare(loads(dumps(result(nan))), exp, 1e-3, 0)[0]
    assert "1 of 6 cells" in compare(exp, loads(dumps(result(nan))), 1e-3, 0)[0]


def test_nan_result_is_refused_naming_the_cells():
    nan = torch.zeros(2, 3)
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"heatmap 'r' has 1 NaN cell\(s\) \(layer='1', "
                                         r"pos='2 John'\).*never recorded"):
        HeatmapExtension().serialize(result(nan))


def test_compare_labels_and_shape_exactly():
    base = torch.zeros(2, 3)
    exp = loads(dumps(result(base)))
    relabelled = {"layer": ["0", "1"], "pos": ["0 <bos>", "1 John", "2 Mary"]}
    msg = compare(loads(dumps(result(base, relabelled))), exp, 1, 1)
    assert msg == ["labels of axis 'pos' differ at 2 places: [1] '1 Mary' -> '1 John', "
                   "[2] '2 John' -> '2 Mary'"]
    wider = {"layer": ["0", "1"], "pos": ["0 <bos>", "1 Mary", "2 John", "3 went"]}
    msg = compare(loads(dumps(result(torch.zeros(2, 4), wider))), exp, 1, 1)
    assert msg == ["shape differs (layer x pos): snapshot (2, 3), received (2, 4)"]
    swapped = Result("r", ("pos", "layer"), LABELS, torch.zeros(3, 2))
    assert "axes differ" in compare(loads(dumps(swapped)), exp, 1, 1)[0]


def test_extension_matches_within_the_data_tolerance_and_rejects_other_data():
    ext = HeatmapExtension()
    stored = dumps(result(torch.zeros(2, 3)))
    assert ext.matches(serialized_data=ext.serialize(result(torch.full((2, 3), 5e-4))),
                       snapshot_data=stored)
    near = ext.serialize(result(torch.full((2, 3), 0.05)))
    assert not ext.matches(serialized_data=near, snapshot_data=stored)
    assert ext.matches(serialized_data=ext.serialize(within(result(torch.full((2, 3), 0.05)),
                                                            atol=0.1)), snapshot_data=stored)
    assert not ext.matches(serialized_data=near, snapshot_data="{ not json")
    with pytest.raises(TypeError, match="take a mechtests Result"):
        ext.serialize({"values": [1]})
    with pytest.raises(ValueError, match="tolerances must be >= 0"):
        within(result(torch.zeros(2, 3)), atol=-1)


@pytest.mark.parametrize("params,expect", [
    ({"subject": SimpleNamespace(spec="fixtures/organisms/induction")},
     "fixtures/organisms/induction"),                           # a loaded subject: its spec
    ({"subject": "multitask", "kind": "ABBA"}, "multitask"),    # a subject given by name
    ({"model": "gpt2", "kind": "BABA"}, "gpt2"),                # the ``model`` parameter
    ({"subject": "a", "model": "b"}, "a"),                      # subject first
    ({"kind": "ABBA"}, None),                                   # neither
], ids=["subject-spec", "subject-str", "model", "subject-first", "neither"])
def test_model_of_reads_the_subject_or_model_parameter(params, expect):
    assert model_of(SimpleNamespace(callspec=SimpleNamespace(params=params))) == expect


def test_model_of_an_unparametrized_test_is_none(request):
    assert model_of(request.node) is None


# -- whole sessions with syrupy ----------------------------------------------------------------
def test_within_tolerance_passes_and_is_not_rewritten(pytester):
    run(pytester, "--snapshot-update").assert_outcomes(passed=3)
    path = snap_file(pytester, "tiny")
    stored = path.read_text()
    assert loads(stored)["model"] == "tiny"
    assert loads(snap_file(pytester, "gpt2").read_text())["values"][0][0] == 1

    out = run(pytester, "--snapshot-update", delta={"tiny": [(1, 2, 5e-4)]})
    out.assert_outcomes(passed=3)
    assert path.read_text() == stored
    assert "updated" not in out.stdout.str() and "2 snapshots passed" in out.stdout.str()

    # the control: a real change is rewritten
    out = run(pytester, "--snapshot-update", delta={"tiny": [(1, 2, 0.05)]})
    assert "1 snapshot updated" in out.stdout.str()
    assert loads(path.read_text())["values"][1][2] == pytest.approx(0.55)


def test_out_of_tolerance_fails_naming_the_cell_and_difference(pytester):
    run(pytester, "--snapshot-update").assert_outcomes(passed=3)
    out = run(pytester, delta={"tiny": [(1, 2, 0.05)]})
    out.assert_outcomes(passed=2, failed=1)
    text = out.stdout.str()
    assert "heatmap 'resid sweep' (model tiny) differs from its snapshot" in text
    assert "1 of 6 cells differ by more than atol=0.001; max abs diff 0.05 at layer='1', " \
           "pos='2 John'" in text
    assert "expected 0.5, actual 0.55 (diff +0.05)" in text
    assert "--snapshot-update" in text
    # the same change passes at a looser per-snapshot tolerance
    run(pytester, delta={"tiny": [(1, 2, 0.05)]}, atol=0.1).assert_outcomes(passed=3)


def test_snapshots_of_models_that_did_not_run_are_kept(pytester):
    run(pytester, "--snapshot-update", extra=EXTRA).assert_outcomes(passed=4)
    gpt2, dropped = snap_file(pytester, "gpt2"), snap_file(pytester, "tiny", "test_dropped_later",
                                                           "other")
    assert gpt2.exists() and dropped.exists()
    gpt2_text = gpt2.read_text()

    # (--snapshot-update both reports unused snapshots and deletes them: one run checks both)
    # gpt2 not asked for at all: its snapshot is neither unused nor deleted
    out = run(pytester, "--snapshot-update", models=["tiny"], extra=EXTRA)
    out.assert_outcomes(passed=3)
    assert "unused" not in out.stdout.str() and gpt2.read_text() == gpt2_text

    # gpt2 asked for but its weights are missing: the test skips, the snapshot stays
    out = run(pytester, "--snapshot-update", skip=["gpt2"], extra=EXTRA)
    out.assert_outcomes(passed=3, skipped=1)
    assert "unused" not in out.stdout.str() and gpt2.read_text() == gpt2_text

    # the control: a snapshot whose test was removed, for a model that ran, is unused and goes
    out = run(pytester, models=["tiny"])
    assert "1 snapshot unused" in out.stdout.str() and out.ret != 0
    out = run(pytester, "--snapshot-update", models=["tiny"])
    assert "1 unused snapshot deleted" in out.stdout.str()
    assert not dropped.exists() and gpt2.read_text() == gpt2_text


def test_assert_heatmap_explains_outside_rewritten_modules(pytester):
    pytester.makepyfile(test_helper='''
import torch
from mechtests.core.result import Result
from mechtests.suite.snapshot import assert_heatmap

def test_h(snapshot, request):
    shift = float(request.config.getoption("--snapshot-update") is False) * 0.5
    r = Result("h", ("head",), {"head": ["0", "1"]}, torch.tensor([0.0, 1.0 + shift]))
    assert_heatmap(snapshot, r, name="h", atol=0.1)
''')
    args = ("-p", "mechtests.suite.snapshot", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
            "--assert=plain")  # nothing rewritten: the message must come from assert_heatmap
    pytester.runpytest_inprocess(*args, "--snapshot-update").assert_outcomes(passed=1)
    out = pytester.runpytest_inprocess(*args)
    out.assert_outcomes(failed=1)
    assert "1 of 2 cells differ by more than atol=0.1; max abs diff 0.5 at head='1'" in \
        out.stdout.str()


# -- --snapshot-update touches only what it must (issue 10) ------------------------------------
SYRUPY_UNUSED = re.compile(r"\d+ (unused snapshots? deleted|snapshots? unused)")


def _files(pytester):
    return {p.name: p.read_text() for p in (pytester.path / "__heatmaps__").rglob("*.heatmap.txt")}


@pytest.mark.parametrize("stop", [(), ("-x",), ("--maxfail=1",)])
def test_update_after_a_failed_or_stopped_run_deletes_nothing(pytester, stop):
    run(pytester, "--snapshot-update", extra=EXTRA).assert_outcomes(passed=4)
    before = _files(pytester)
    assert len(before) == 3
    # tiny's claim fails before pin: its snapshot is not "unused"; with -x/--maxfail the later
    # tests (test_dropped_later[tiny], of a model that did run) never run: theirs stay too
    out = run(pytester, "--snapshot-update", *stop, extra=EXTRA, fail={"before": ["tiny"]})
    assert out.ret == 1
    text = out.stdout.str()
    assert not SYRUPY_UNUSED.search(text) and "Re-run pytest with --snapshot-update" not in text
    assert "the run did not complete" in text
    assert _files(pytester) == before


def test_interrupted_run_deletes_nothing_and_advises_nothing(pytester):
    run(pytester, "--snapshot-update", extra=EXTRA).assert_outcomes(passed=4)
    before = _files(pytester)
    for args in (("--snapshot-update",), ()):
        out = run(pytester, *args, extra=EXTRA, fail={"interrupt": ["gpt2"]})
        assert out.ret == pytest.ExitCode.INTERRUPTED
        text = out.stdout.str()
        assert not SYRUPY_UNUSED.search(text)
        assert "Re-run pytest with --snapshot-update" not in text
        assert "the run did not complete (interrupted)" in text
        assert _files(pytester) == before


def test_snapshot_of_a_test_that_failed_after_pin_is_not_overwritten(pytester):
    run(pytester, "--snapshot-update").assert_outcomes(passed=3)
    path = snap_file(pytester, "tiny")
    stored = path.read_text()
    out = run(pytester, "--snapshot-update", delta={"tiny": [(1, 2, 0.5)]},
              fail={"after": ["tiny"]})
    out.assert_outcomes(passed=2, failed=1)
    assert path.read_text() == stored
    assert "1 heatmap snapshot(s) not written because their test did not pass" in \
        out.stdout.str()
    # the control: once the test passes, the change is written
    run(pytester, "--snapshot-update", delta={"tiny": [(1, 2, 0.5)]}).assert_outcomes(passed=3)
    assert loads(path.read_text())["values"][1][2] == pytest.approx(1.0)


def test_a_passing_run_still_cleans_up_what_is_really_unused(pytester):
    run(pytester, "--snapshot-update", extra=EXTRA).assert_outcomes(passed=4)
    dropped = snap_file(pytester, "tiny", "test_dropped_later", "other")
    # a failing run does not delete it ...
    run(pytester, "--snapshot-update", fail={"before": ["gpt2"]})
    assert dropped.exists()
    # ... a passing one does: its test is gone and its model ran
    out = run(pytester, "--snapshot-update")
    assert "1 unused snapshot deleted" in out.stdout.str() and not dropped.exists()
