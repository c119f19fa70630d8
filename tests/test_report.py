"""The claims report: what it says, and that it is written whole, once per finished run, or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechtests.suite import render as ren
from mechtests.suite.render import render_md
from mechtests.suite.report import TestResult, build, write_report

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
    # one glyph and the key number per cell; the tally per checkpoint in the column header
    assert "| claim | gpt2 · 1✓ 1– | tiny · 1✗ 1✓ |" in md
    assert "| [ioi.name_movers](#ioiname_movers) | ✓ 0.82 (≥ 0.5) | ✗ 0.31 (≥ 0.5) |" in md
    assert "| [induction](#induction) | – | ✓ |" in md
    assert "- ✗ **ioi.name_movers** on `tiny`: AssertionError: score = 0.31" not in md
    assert "- ✗ **ioi.name_movers** on `tiny`: score = 0.31" in md  # why, without the noise
    assert "- induction on gpt2: gpt2 weights are not on this machine" in md


def test_several_tests_in_one_cell_show_the_worst_and_the_counts():
    a = TestResult("c.py::test_a[tiny]", "x", model="tiny", outcome="held")
    b = TestResult("c.py::test_b[tiny]", "x", model="tiny", outcome="error", reason="setup: boom")
    cell = build([a, b], {"models": ["tiny"]})["claims"][0]["cells"]["tiny"]
    assert cell["outcome"] == "error" and cell["text"] == "setup: boom; (1 error, 1 held)"


# -- the renderers, on synthetic data with every outcome (as the verdicts issue will produce) ---
LONG = ("gpt2 weights are not on this machine: " + "x" * 400 + " (hf download gpt2)")


def every_outcome() -> dict:
    """A report's data with each outcome, sanity checks, moved components and mutation verdicts."""
    def m(what, value, threshold, op=">=", kind=None):
        held = {">=": value >= threshold, "<=": value <= threshold}[op]
        out = {"what": what, "value": value, "threshold": threshold, "op": op, "held": held}
        return {**out, "kind": kind} if kind else out

    tests = [
        ("a.py::test_movers[ft-ABBA]", "ioi.name_movers", "ft", "moved", "", [
            m("heads with the largest DLA: expected ['9.9'] among ['10.2', '9.6']", 1, 1)],
         {"moved": {"9.9": "10.2"}}),
        ("a.py::test_movers[base-ABBA]", "ioi.name_movers", "base", "held", "", [
            m("heads with the largest DLA: expected ['9.9'] among ['9.9', '9.6']", 1, 1)], {}),
        ("a.py::test_knock[ft]", "ioi.knockout", "ft", "failed",
         "AssertionError: fraction lost: measured 0.06, claim needs >= 0.4 (why: 55% measured)",
         [m("fraction lost", 0.06, 0.4), m("clean run differs", 1.0, 0.5, kind="sanity")], {}),
        ("a.py::test_knock[base]", "ioi.knockout", "base", "held", "",
         [m("fraction lost", 0.55, 0.4)], {}),
        ("a.py::test_exists[ft]", "induction.exists", "ft", "error",
         "AttributeError: 'Bridge' object has no attribute 'blocks'", [], {}),
        ("a.py::test_exists[base]", "induction.exists", "base", "inconclusive",
         "effect too small to judge: clean and corrupted differ by 0.01 logits (needs 0.5)",
         [m("effect size", 0.01, 0.5)], {}),
        ("a.py::test_entropy[ft]", "entropy.ablation", "ft", "skipped", LONG, [], {}),
        ("a.py::test_entropy[base]", "entropy.ablation", "base", "skipped", LONG, [], {}),
        ("a.py::test_x[ft]", "x.expected", "ft", "xfailed", "known to fail on fine-tunes", [], {}),
        ("a.py::test_x[base]", "x.expected", "base", "xpassed", "", [], {}),
    ]
    rs = [TestResult(n, c, "", mod, o, reason=r, measurements=ms) for n, c, mod, o, r, ms, _ in
          tests]
    data = build(rs, {"date": "2026-11-21T15:30:00+00:00", "models": ["base", "ft"]})
    for claim in data["claims"]:
        for cell in claim["cells"].values():
            for t in cell["tests"]:
                t.update(next(extra for n, *_, extra in tests if n == t["nodeid"]))
    data["mutation"] = {
        "ioi.name_movers": {"verdict": "discriminating", "matrix": {
            "relabel heads": {"base": "same values"}, "break 9.9 QK": {"base": True}}},
        "ioi.knockout": {"verdict": "cannot fail when 1.1 breaks", "matrix": {}},
    }
    return data


def screenshot_every_outcome(png: str) -> None:
    """The page of ``every_outcome()`` as Chromium shows it at 1400 px (for the README)::

        python -c "import sys; sys.path.insert(0, 'tests'); import test_report as t; \\
                   t.screenshot_every_outcome('out.png')"
    """
    import tempfile

    from mechtests.suite import browser

    data = every_outcome()
    data["settings"]["command"] = "synthetic data: tests/test_report.py::every_outcome"
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        ren.draw(data, images)
        (Path(tmp) / "report.html").write_text(ren.render_html(data, images), encoding="utf-8")
        browser.screenshot(Path(tmp) / "report.html", Path(png), height=520)


def test_every_outcome_has_its_glyph_key_number_and_reason():
    from mechtests.suite import render

    data = every_outcome()
    keys = {(c["id"], mod): (render.worst(cell["tests"]), *render.cell_key(cell))
            for c in data["claims"] for mod, cell in c["cells"].items()}
    assert keys[("ioi.name_movers", "ft")] == ("moved", "9.9→10.2", "")
    assert keys[("ioi.name_movers", "base")] == ("held", "1/1", "found")
    assert keys[("ioi.knockout", "ft")] == ("failed", "0.06", "≥ 0.4")  # not the sanity check
    assert keys[("induction.exists", "ft")] == ("error", "AttributeError", "")
    assert keys[("induction.exists", "base")] == ("inconclusive", "0.01", "≥ 0.5")
    assert keys[("x.expected", "base")][0] == "xpassed"
    md = render.render_md(data)
    assert "| [ioi.name_movers](#ioiname_movers) · _discriminating_ | ✓ 1/1 found | ↷ 9.9→10.2 |" \
        in md
    assert "· _cannot fail when 1.1 breaks_ | ✓ 0.55 (≥ 0.4) | ✗ 0.06 (≥ 0.4) |" in md
    assert "| [induction.exists](#inductionexists) | ? 0.01 (≥ 0.5) | ⚠ AttributeError |" in md
    assert "entropy.ablation](#" not in md  # skipped everywhere: a note, not a matrix row
    assert md.count(LONG) == 1 and "- entropy.ablation on all 2 checkpoints: " + LONG in md
    assert "- ⚠ **induction.exists** on `ft`: AttributeError: 'Bridge' object" in md
    assert "held with the components moved (9.9 → 10.2)" in md
    assert "clean run differs = 1 (needs ≥ 0.5) ✓ [sanity check]" in md
    page = render.render_html(data, Path("."))
    assert page.count(LONG) == 1  # the 450-character reason once, not in every cell
    assert "<span class='mut good'" in page and "<span class='mut warn'" in page
    assert "break 9.9 QK" in page and "killed" in page  # the kill matrix, on demand
    assert "<script" not in page  # no JavaScript
    for glyph in "✓↷✗⚠?!⊘":
        assert f"<span class='g'>{glyph}</span>" in page
    # the full measurement and reason are in the cell (hover title and <details>)
    assert "title='ABBA: held, moved; components moved: 9.9 → 10.2;" in page
    assert "<details><summary><span class='g'>✗</span><b>0.06</b>" in page


def test_renders_what_the_current_plugin_produces_without_the_new_fields():
    from mechtests.suite import render

    data = build(results(), SETTINGS)  # no moved, no kind, no mutation, no checkpoints
    page = render.render_html(data, Path("."))
    assert "ioi.name_movers" in page and "mut " not in page


def test_held_sets_read_as_found_of_expected():
    from mechtests.suite import render

    meas = {"what": "top heads: expected ['3.3', '1.1'] among ['1.3', '1.0', '1.2']",
            "value": 0, "threshold": 2, "op": ">=", "held": False}
    assert render.measure_short(meas) == ("0/2", "found")
    assert render.measure_text(meas) == ("top heads: 0 of 2 expected (3.3, 1.1) among 1.3, 1.0, "
                                         "1.2 ✗")


def heat(values, name="head attribution"):
    rows, cols = len(values), len(values[0])
    return {"name": name, "axes": ["layer", "head"],
            "labels": {"layer": [str(i) for i in range(rows)],
                       "head": [str(i) for i in range(cols)]}, "values": values, "meta": {}}


def test_reference_heatmap_is_the_stored_snapshot_of_the_model_or_its_shape(tmp_path):
    import torch

    from mechtests.core.result import Result
    from mechtests.suite.render import reference_heatmap
    from mechtests.suite.snapshot import dumps

    test_file = tmp_path / "claims" / "test_ioi.py"
    folder = test_file.parent / "__heatmaps__" / "test_ioi"
    folder.mkdir(parents=True)
    for model, size, value in [("gpt2", 3, 9.0), ("multitask", 2, 1.0)]:
        res = Result("head attribution", ("layer", "head"),
                     {"layer": [str(i) for i in range(size)],
                      "head": [str(i) for i in range(size)]},
                     torch.full((size, size), value))
        (folder / f"test_nm[{model}-ABBA][head_dla].heatmap.txt").write_text(dumps(res, model))
    small = heat([[0.0, 1.0], [2.0, 3.0]])
    own = reference_heatmap(test_file, "test_nm", "multitask-ABBA", "multitask", small)
    assert own["model"] == "multitask" and own["result"]["values"] == [[1.0, 1.0], [1.0, 1.0]]
    # a fine-tune of the organism: the snapshot of the same shape, not GPT-2's
    ft = reference_heatmap(test_file, "test_nm", "ckpt/ft-ABBA", "ckpt/ft", small)
    assert ft["model"] == "multitask" and ft["file"] == \
        "test_ioi/test_nm[multitask-ABBA][head_dla].heatmap.txt"
    assert reference_heatmap(test_file, "test_nm", "ckpt/ft-BABA", "ckpt/ft", small) is None
    assert reference_heatmap(test_file, "test_nm", "ckpt/ft-ABBA", "ckpt/ft",
                             {**small, "name": "other"}) is None


@pytest.fixture
def report_dir(tmp_path):
    """A report directory with its images/ folder."""
    (tmp_path / "images").mkdir()
    return tmp_path


def test_heatmaps_reference_first_shared_scale_and_difference(report_dir):
    from mechtests.suite import render

    ref = {"model": "base", "file": "t/x.heatmap.txt", "result": heat([[1.0, 0.0], [0.0, 1.0]])}
    big = {"model": "gpt2", "file": "t/y.heatmap.txt", "result": heat([[5.0] * 3] * 3)}
    data = build([
        TestResult("a.py::t[base]", "c", model="base", outcome="held",
                   heatmaps=[{"title": "h", "result": heat([[1.0, 0.0], [0.0, 1.0]]),
                              "reference": ref}]),
        TestResult("a.py::t[ft]", "c", model="ft", outcome="held",
                   heatmaps=[{"title": "h", "result": heat([[0.5, 0.0], [0.0, 3.0]]),
                              "reference": ref}]),
        TestResult("a.py::t[odd]", "c", model="odd", outcome="held",
                   heatmaps=[{"title": "h", "result": heat([[0.5, 0.0, 1.0]]),
                              "reference": big}]),
    ], {"models": ["base", "ft", "odd"]})
    render.draw(data, images := report_dir / "images")
    (fig,) = data["claims"][0]["figures"]
    captions = [i["caption"] for i in fig["images"]]
    assert captions == ["reference: base (stored)", "reference: gpt2 (stored)", "base", "ft",
                        "odd"]
    # differences only where the shapes match the reference
    assert [d["caption"] for d in fig["diffs"]] == ["base − reference", "ft − reference"]
    assert all((report_dir / i["file"]).exists() for i in fig["images"] + fig["diffs"])
    page = render.render_html(data, images)
    assert page.count("data:image/png;base64,") == 7
    assert page.index("reference: base (stored)") < page.index("alt='base'")


def test_one_dimensional_results_are_line_plots(report_dir):
    from mechtests.suite import render

    def sweep(values):
        return {"name": "steering", "axes": ["alpha"],
                "labels": {"alpha": ["0", "0.5", "1"]}, "values": values, "meta": {}}

    ref = {"model": "base", "file": "t/s.heatmap.txt", "result": sweep([0.0, 1.0, 2.0])}
    data = build([
        TestResult(f"a.py::t[{mod}]", "c", model=mod, outcome="held",
                   heatmaps=[{"title": "steer", "result": sweep(v), "reference": ref}])
        for mod, v in [("base", [0.0, 1.0, 2.0]), ("ft", [0.0, 2.0, 4.0])]],
        {"models": ["base", "ft"]})
    render.draw(data, report_dir / "images")
    (fig,) = data["claims"][0]["figures"]
    assert [i["file"].endswith("--lines.png") for i in fig["images"]] == [True]
    assert [d["file"].endswith("--lines-diff.png") for d in fig["diffs"]] == [True]


def test_training_sequences_plot_the_value_against_step(report_dir):
    from mechtests.suite import render

    rs = [TestResult(f"a.py::t[step{s}]", "induction.exists", model=f"step{s}",
                     outcome="held" if v >= 0.45 else "failed",
                     measurements=[{"what": "induction score", "value": v, "threshold": 0.45,
                                    "op": ">=", "held": v >= 0.45}])
          for s, v in [(0, 0.05), (200, 0.1), (400, 0.6), (600, 0.7)]]
    data = build(rs, {"models": [f"step{s}" for s in (0, 200, 400, 600)]})
    data["checkpoints"] = {f"step{s}": {"step": s, "loss": 3.0 - s / 300} for s in (0, 200, 400,
                                                                                     600)}
    render.draw(data, images := report_dir / "images")
    (fig,) = data["claims"][0]["figures"]
    assert fig["title"] == "against training step"
    assert fig["images"][0]["caption"] == "induction score against training step"
    page = render.render_html(data, images)
    assert "step 400" in page  # the column headers say the step


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
    assert "![gpt2](images/ioi.name_movers--head_attribution--gpt2.png)" in md


def test_a_report_is_drawn_again_from_its_json(tmp_path):
    first = write_report(results(), SETTINGS, tmp_path / "runs")
    again = ren.rerender(first / "report.json", tmp_path / "again")
    assert (again / "report.md").read_text() == (first / "report.md").read_text()
    assert sorted(p.name for p in (again / "images").iterdir()) == sorted(
        p.name for p in (first / "images").iterdir())
    with pytest.raises(FileExistsError):  # never over an existing directory
        ren.rerender(first / "report.json", tmp_path / "again")


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, error):
    earlier = write_report(results(), SETTINGS, tmp_path)

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(ren, "render_html", broken)
    with pytest.raises(type(error)):
        write_report(results(), SETTINGS, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [earlier.name]  # no partial dir, earlier kept


# -- in a real browser -----------------------------------------------------------------------------
def wide_data() -> dict:
    """Every outcome, plus what tends to overflow: 12 checkpoints with long paths, a training
    sequence, a 12 x 12 and a 4 x 40 heatmap with token labels, a 60-point sweep."""
    import random

    rng = random.Random(0)
    data = every_outcome()
    models = [f"/data/checkpoints/induction-organism-seed-7/step-{s:06d}" for s in
              range(0, 1200, 100)]
    tokens = ["When", " Mary", " and", " John", " went", " to", " the", " store"]

    def grid(rows, cols, labels=None):
        return {"name": "sweep", "axes": ["layer", "pos"],
                "labels": {"layer": [str(i) for i in range(rows)],
                           "pos": labels or [str(i) for i in range(cols)]},
                "values": [[rng.uniform(-2, 2) for _ in range(cols)] for _ in range(rows)],
                "meta": {}}

    line = {"name": "steer", "axes": ["alpha"], "labels": {"alpha": [str(i) for i in range(60)]},
            "values": [rng.uniform(-5, 5) for _ in range(60)], "meta": {}}
    rs = []
    for i, mod in enumerate(models):
        v = 0.05 + 0.06 * i
        rs.append(TestResult(
            f"claims/test_induction.py::test_heads[{mod}]", "induction.heads with a long name",
            "Olsson et al. 2022", mod, "held" if v >= 0.45 else "failed",
            reason="" if v >= 0.45 else f"AssertionError: induction score: measured {v}, " + LONG,
            measurements=[{"what": "induction score of 1.1, the head the organism's analysis "
                           "names", "value": v, "threshold": 0.45, "op": ">=", "held": v >= 0.45}],
            heatmaps=[{"title": "scores", "result": grid(12, 12)},
                      {"title": "patching", "result": grid(
                          4, 40, [f"{j} {tokens[j % 8]}" for j in range(40)])},
                      {"title": "sweep", "result": line}]))
    wide = build(rs, {"models": models})
    data["claims"] += wide["claims"]
    data["models"] = data["models"] + models
    data["checkpoints"] = {m: {"step": i * 100, "loss": 4 - i * 0.2} for i, m in enumerate(models)}
    return data


def test_the_page_fits_1400_px_in_chromium(tmp_path):
    """Headless Chromium at 1400 px, every <details> open: no table or image sticks out."""
    from mechtests.suite import browser

    if browser.chromium() is None:
        pytest.skip(f"Chromium is not installed here: {browser.HOW}")
    data = wide_data()
    (tmp_path / "images").mkdir()
    ren.draw(data, tmp_path / "images")
    (tmp_path / "report.html").write_text(ren.render_html(data, tmp_path / "images"))
    got = browser.overflow(tmp_path / "report.html", width=1400)
    assert got["viewport"] == 1400
    assert got["overflowing"] == [] and got["page"] <= 1400, got


def test_the_committed_example_report_fits_1400_px_in_chromium():
    from mechtests.suite import browser

    if browser.chromium() is None:
        pytest.skip(f"Chromium is not installed here: {browser.HOW}")
    page = Path(__file__).parent.parent / "reports" / "example" / "report.html"
    got = browser.overflow(page, width=1400)
    assert got["overflowing"] == [] and got["page"] <= 1400, got


# -- whole sessions ------------------------------------------------------------------------------
CLAIMS = '''
import os
import pytest
import torch
from mechtests.core.result import Result


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
    return pytester.runpytest_inprocess("-p", "mechtests.suite.report", "-p", "no:cacheprovider",
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
    assert "| claim | big · 1✗ | gpt2 · 1– | tiny · 2✓ |" in md
    assert "| [induction](#induction) |  | – | ✓ 0.9 (≥ 0.5) |" in md
    assert "- induction on gpt2: gpt2 weights are not on this machine" in md
    assert (run_dir / "report.html").read_text().count("data:image/png;base64,") == 2
    # the JSON keeps every number: each measurement and each heatmap cell
    tests = {t["nodeid"].split("::")[-1]: t for c in data["claims"] for cell in c["cells"].values()
             for t in cell["tests"]}
    big = tests["test_name_movers[big]"]
    assert big["measurements"][0]["value"] == pytest.approx(0.31)
    assert big["heatmaps"][0]["result"]["values"] == [[pytest.approx(0.31), 0.0],
                                                     [0.0, pytest.approx(0.31)]]


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


def test_a_run_that_checks_nothing_writes_no_report_and_says_so(pytester):
    out = run_claims(pytester, "-k", "gpt2")  # the only selected claim test skips
    out.assert_outcomes(skipped=1)
    assert runs(pytester) == []
    assert "every claim skipped (nothing was checked): no report written" in out.stdout.str()


def test_an_interrupted_run_writes_nothing(pytester, monkeypatch):
    monkeypatch.setenv("INTERRUPT_INNER", "1")
    out = run_claims(pytester, no_reraise_ctrlc=True)
    assert out.ret == pytest.ExitCode.INTERRUPTED
    assert runs(pytester) == []
    assert "no report written" in out.stdout.str()


# -- progress bars ---------------------------------------------------------------------------------
def test_progress_is_quiet_on_ci_and_under_capture_and_can_be_forced(monkeypatch, capsys):
    from mechtests.core.progress import progress, quiet

    monkeypatch.delenv("MECHTESTS_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert quiet()  # pytest captures stderr: not a terminal
    monkeypatch.setenv("CI", "true")
    assert list(progress(range(3), "sweep")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MECHTESTS_PROGRESS", "1")
    assert list(progress(range(3), "sweep", total=3)) == [0, 1, 2]
    assert "sweep" in capsys.readouterr().err
