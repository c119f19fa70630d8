"""Heatmap snapshots: syrupy snapshots of ``Result`` objects, compared with a numeric tolerance.

Each snapshot is one reviewable text file (JSON, one row of values per line) next to the test::

    claims/__heatmaps__/test_ioi/test_name_movers[gpt2][head_attr].heatmap.txt

Usage in a claim (``heatmap_snapshot`` is a fixture of this plugin)::

    assert heatmap_snapshot(name="head_attr") == result                    # atol 1e-3
    assert heatmap_snapshot(name="head_attr") == within(result, atol=1e-2)

Values match when ``|actual - expected| <= atol + rtol * |expected|`` in every cell; axes, labels
and shape must match exactly. A snapshot that matches within tolerance counts as a match, so
``--snapshot-update`` leaves its file alone; only snapshots that really changed are rewritten.

``--snapshot-update`` touches only what it must. A snapshot file is written, and is visible to
syrupy (so it can be reported unused or deleted), only when its own test passed in this session
(setup, call and teardown); a file whose test no longer exists is visible only when its model
got a test through its call phase here and its module was collected. After a session that did
not complete (a failure, ``-x``/``--maxfail``, Ctrl-C, a collection error) syrupy's unused
detection is off: nothing is deleted and nothing is advised. A NaN never matches and is never
recorded. The state lives in the pytest session (``config.stash``), not in globals.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from mechtests.core.result import Result

DEFAULT_ATOL = 1e-3
DEFAULT_RTOL = 0.0
MODEL_PARAMS = ("subject", "model")  # the parameter that names a test's model, first found wins


@dataclass(frozen=True)
class Within:
    """A result with the tolerance to compare it at: ``snapshot == within(result, atol=1e-2)``."""

    result: Result
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL


def within(result: Result, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> Within:
    """Compare ``result`` to its snapshot at this tolerance (per snapshot)."""
    if atol < 0 or rtol < 0:
        raise ValueError(f"tolerances must be >= 0, got atol={atol}, rtol={rtol}")
    return Within(result, atol, rtol)


class _Serialized(str):
    """The serialized text, carrying the tolerance it is to be compared at (never written)."""

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL


def model_of(item: pytest.Item) -> str | None:
    """The model a test runs against: its ``subject`` (or ``model``) parameter, else None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    for key in MODEL_PARAMS:
        if key in params:
            value = params[key]
            return value if isinstance(value, str) else str(getattr(value, "spec", value))
    return None


# -- the text format -------------------------------------------------------------------------------
def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return format(v, ".6g")


def _rows(values: Any, indent: int) -> str:
    pad = " " * indent
    if not values or not isinstance(values[0], list):  # innermost row: one line
        return "[" + ", ".join(_num(v) for v in values) + "]"
    inner = ",\n".join(pad + " " + _rows(v, indent + 1) for v in values)
    return "[\n" + inner + "\n" + pad + "]"


def dumps(result: Result, model: str | None = None) -> str:
    """Reviewable JSON: name, model, axes, one line per axis of labels, one line per row."""
    vals = result.values.tolist()
    if result.values.dim() == 1:  # a long vector reads (and diffs) better one value per line
        body = "[\n" + ",\n".join("  " + _num(v) for v in vals) + "\n ]"
    else:
        body = _rows(vals, 1)
    labels = ",\n".join(f"  {json.dumps(a)}: {json.dumps(result.labels[a])}" for a in result.axes)
    return (
        "{\n"
        f' "name": {json.dumps(result.name)},\n'
        f' "model": {json.dumps(model)},\n'
        f' "axes": {json.dumps(list(result.axes))},\n'
        f' "labels": {{\n{labels}\n }},\n'
        f' "values": {body}\n'
        "}\n"
    )


def loads(text: str) -> dict[str, Any]:
    """Parse a heatmap snapshot file (the inverse of ``dumps``)."""
    data = json.loads(text)
    if not isinstance(data, dict) or not {"axes", "labels", "values"} <= data.keys():
        raise ValueError("not a heatmap snapshot: expected a JSON object with axes/labels/values")
    return data


# -- comparison ------------------------------------------------------------------------------------
def _flat(values: Any) -> list[float]:
    if isinstance(values, list):
        return [x for v in values for x in _flat(v)]
    return [float(values)]


def _shape(data: dict[str, Any]) -> tuple[int, ...]:
    return tuple(len(data["labels"][a]) for a in data["axes"])


def compare(actual: dict[str, Any], expected: dict[str, Any], atol: float, rtol: float,
            max_cells: int = 10) -> list[str]:
    """Problems found comparing two parsed heatmaps; empty when they match within tolerance."""
    if list(actual["axes"]) != list(expected["axes"]):
        return [f"axes differ: snapshot has {expected['axes']}, received {actual['axes']}"]
    axes = list(expected["axes"])
    if _shape(actual) != _shape(expected):
        dims = " x ".join(axes)
        return [f"shape differs ({dims}): snapshot {_shape(expected)}, received {_shape(actual)}"]
    problems = []
    for a in axes:
        got, want = actual["labels"][a], expected["labels"][a]
        bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
        if bad:
            shown = ", ".join(f"[{i}] {want[i]!r} -> {got[i]!r}" for i in bad[:5])
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            problems.append(f"labels of axis {a!r} differ at {len(bad)} places: {shown}{more}")
    if problems:
        return problems
    got, want = _flat(actual["values"]), _flat(expected["values"])
    shape = _shape(expected)
    if len(got) != math.prod(shape) or len(want) != math.prod(shape):
        return [f"values do not fit the labels {shape}: snapshot has {len(want)} values, "
                f"received {len(got)}"]
    bad_cells = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if math.isnan(g) or math.isnan(w):  # NaN never matches, not even NaN
            ok, diff = False, math.inf
        else:
            diff = abs(g - w)
            ok = g == w or diff <= atol + rtol * abs(w)
        if not ok:
            bad_cells.append((diff, i, g, w))
    if not bad_cells:
        return []
    bad_cells.sort(key=lambda c: -c[0])
    tol = f"atol={atol:g}" + (f" + rtol={rtol:g}*|expected|" if rtol else "")
    worst = bad_cells[0]
    lines = [
        f"{len(bad_cells)} of {len(want)} cells differ by more than {tol}; "
        f"max abs diff {worst[0]:.4g} at {_where(worst[1], shape, axes, expected['labels'])}"
    ]
    for _, i, g, w in bad_cells[:max_cells]:
        lines.append(f"  {_where(i, shape, axes, expected['labels'])}: expected {w:.6g}, "
                     f"actual {g:.6g} (diff {g - w:+.4g})")
    if len(bad_cells) > max_cells:
        lines.append(f"  ... and {len(bad_cells) - max_cells} more cells")
    return lines


def _where(flat: int, shape: tuple[int, ...], axes: list[str], labels: dict[str, list]) -> str:
    coords = []
    for n in reversed(shape):
        coords.append(flat % n)
        flat //= n
    coords.reverse()
    return ", ".join(f"{a}={labels[a][c]!r}" for a, c in zip(axes, coords, strict=True))


# -- the session's state (config.stash) ------------------------------------------------------
@dataclass
class _State:
    """What this session ran: each test's module, snapshot-name prefix and model; which tests
    passed; which models ran; whether the test loop completed; the writes held back."""

    items: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)
    passed: set[str] = field(default_factory=set)
    active: set[str] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)
    complete: bool = False
    uses_snapshots: bool = False  # a collected test uses syrupy's ``snapshot`` fixture
    held_back: list[str] = field(default_factory=list)
    note: str = ""

    def owner(self, filepath: str) -> str | None:
        """The collected test a snapshot file belongs to (longest name prefix), or None."""
        path = Path(filepath)
        module = str((path.parent.parent.parent / f"{path.parent.name}.py").resolve())
        stem = path.name.removesuffix("." + HeatmapExtension.file_extension)
        best, best_len = None, -1
        for nodeid, (mod, prefix, _) in self.items.items():
            if mod == module and len(prefix) > best_len and (
                    stem == prefix or stem.startswith((prefix + "[", prefix + "."))):
                best, best_len = nodeid, len(prefix)
        return best


STATE = pytest.StashKey[_State]()


def _state_of(test_location: Any) -> _State | None:
    config = getattr(getattr(test_location, "item", None), "config", None)
    return config.stash.get(STATE, None) if config is not None else None


class HeatmapExtension(SingleFileSnapshotExtension):
    """One ``.heatmap.txt`` file per snapshot, matched within a numeric tolerance.

    Files live in ``__heatmaps__/<test module>/`` beside the test module, not in
    ``__snapshots__``: syrupy's default (amber) extension treats every foreign file in
    ``__snapshots__`` as an unknown collection it may delete, which would undo the protection of
    snapshots for models that did not run.
    """

    file_extension = "heatmap.txt"
    snapshot_dirname = "__heatmaps__"
    write_immediately = False  # queued to the session's end, when it is known which tests passed
    _write_mode = WriteMode.TEXT
    model: str | None = None  # set by the ``heatmap_snapshot`` fixture, recorded in the file

    @classmethod
    def dirname(cls, *, test_location: Any) -> str:
        test_dir = Path(test_location.filepath).parent
        return str(test_dir / cls.snapshot_dirname / test_location.basename)

    def serialize(self, data: Any, **kwargs: Any) -> _Serialized:
        heat = data if isinstance(data, Within) else Within(data)
        if not isinstance(heat.result, Result):
            raise TypeError(
                f"heatmap snapshots take a mechtests Result (or within(result, atol=...)), got "
                f"{type(heat.result).__name__}; use the plain `snapshot` fixture for other data"
            )
        nan = torch.isnan(heat.result.values)
        if nan.any():
            shape = tuple(heat.result.values.shape)
            cells = [_where(int(i), shape, list(heat.result.axes), heat.result.labels)
                     for i in nan.flatten().nonzero()[:5, 0]]
            raise ValueError(
                f"heatmap {heat.result.name!r} has {int(nan.sum())} NaN cell(s) ({'; '.join(cells)}"
                f"{' ...' if int(nan.sum()) > 5 else ''}): a NaN never matches a snapshot and is "
                f"never recorded. Find where it comes from (a metric that returns NaN raises "
                f"MetricError naming the prompt) and fix it there."
            )
        text = _Serialized(dumps(heat.result, self.model))
        text.atol, text.rtol = heat.atol, heat.rtol
        return text

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        try:
            actual, expected = loads(serialized_data), loads(snapshot_data)
        except ValueError:  # JSONDecodeError is a ValueError: an unreadable file never matches
            return False
        atol = getattr(serialized_data, "atol", DEFAULT_ATOL)
        rtol = getattr(serialized_data, "rtol", DEFAULT_RTOL)
        return actual.get("name") == expected.get("name") and not compare(
            actual, expected, atol, rtol)

    def diff_lines(self, serialized_data: Any, snapshot_data: Any):
        if not snapshot_data:
            yield "no stored heatmap yet: run `pytest --snapshot-update` to record it"
            return
        try:
            actual, expected = loads(serialized_data), loads(snapshot_data)
        except ValueError as exc:
            yield f"the stored heatmap file is not readable ({exc}); rewrite it with " \
                  "`pytest --snapshot-update`"
            return
        atol = getattr(serialized_data, "atol", DEFAULT_ATOL)
        rtol = getattr(serialized_data, "rtol", DEFAULT_RTOL)
        head = f"heatmap {expected.get('name')!r}"
        if expected.get("model"):
            head += f" (model {expected['model']})"
        yield f"{head} differs from its snapshot:"
        if actual.get("name") != expected.get("name"):
            yield f"  name: snapshot {expected.get('name')!r}, received {actual.get('name')!r}"
        yield from ("  " + line for line in compare(actual, expected, atol, rtol))
        yield "If the change is intended, accept it with `pytest --snapshot-update`."

    def owns_snapshot_collection(self, *, filepath: str, test_location: Any) -> bool:
        """Only files syrupy may judge: their own test passed in this session, or (no test owns
        them any more) their module was collected and their model ran a test here.

        The others (a test that failed, was skipped, stopped or never ran; a model whose weights
        are missing, or not asked for) are invisible to syrupy, so they are never reported
        unused nor deleted by ``--snapshot-update``.
        """
        if not super().owns_snapshot_collection(filepath=filepath, test_location=test_location):
            return False
        state = _state_of(test_location)
        if state is None:  # used outside a session with this plugin
            return True
        path = Path(filepath)
        module = path.parent.parent.parent / f"{path.parent.name}.py"
        if str(module.resolve()) not in state.modules:  # e.g. --ignore'd: not ours to judge
            return False
        owner = state.owner(filepath)
        if owner is not None:
            return owner in state.passed
        try:
            model = loads(path.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError):
            return True
        return model is None or model in state.active

    @classmethod
    def write_snapshot(cls, *, snapshot_location: str, snapshots: list, **kwargs: Any) -> None:
        """Write only the snapshots of tests that passed (writes are queued to the session's end
        for this): a test that failed after ``pin`` never overwrites its committed snapshot."""
        keep = []
        for snap in snapshots:
            state = _state_of(snap[1])
            nodeid = getattr(getattr(snap[1], "item", None), "nodeid", None)
            if state is None or nodeid in state.passed:
                keep.append(snap)
            else:
                state.held_back.append(f"{Path(snapshot_location).name} (test {nodeid})")
        if keep:
            super().write_snapshot(snapshot_location=snapshot_location, snapshots=keep, **kwargs)


def assert_heatmap(snapshot: Any, result: Result, *, name: str | None = None,
                   atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> None:
    """``assert snapshot == within(result)`` with the cell-level message, usable in helpers.

    pytest only explains ``assert snapshot == x`` in rewritten modules (tests, conftest); this
    raises an ``AssertionError`` carrying the explanation from anywhere.
    """
    snap = snapshot(name=name) if name else snapshot
    if not isinstance(snap.extension, HeatmapExtension):
        snap = snap.use_extension(HeatmapExtension)
        if name:
            snap = snap(name=name)
    if not snap == within(result, atol, rtol):
        raise AssertionError("\n".join(str(x) for x in snap.get_assert_diff()))


# -- pytest hooks and fixture (this module is a pytest plugin) ------------------------------------
@pytest.fixture
def heatmap_snapshot(snapshot: Any, request: pytest.FixtureRequest) -> Any:
    """syrupy's ``snapshot`` with the heatmap extension, tagged with the test's model."""
    snap = snapshot.use_extension(HeatmapExtension)
    snap.extension.model = model_of(request.node)
    return snap


def pytest_configure(config: pytest.Config) -> None:
    config.stash[STATE] = _State()
    config.pluginmanager.register(_Tracker(config), "mechtests-snapshot-tracker")


class _Tracker:
    """Fills the session's ``_State`` and turns syrupy's cleanup off after an incomplete run."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.state = config.stash[STATE]

    def pytest_itemcollected(self, item: pytest.Item) -> None:
        if not isinstance(item, pytest.Function):
            return
        from syrupy.location import PyTestLocation

        prefix = HeatmapExtension._sanitize_filename(PyTestLocation(item).snapshot_name)
        module = str(Path(item.path).resolve())
        self.state.items[item.nodeid] = (module, prefix, model_of(item))
        self.state.uses_snapshots |= "snapshot" in getattr(item, "fixturenames", ())
        self.state.modules.add(module)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and report.passed:
            self.state.passed.add(report.nodeid)
        elif report.failed:  # a teardown error undoes a passed call
            self.state.passed.discard(report.nodeid)
        if report.when == "call" and not report.skipped:
            model = self.state.items.get(report.nodeid, (None, None, None))[2]
            if model is not None:
                self.state.active.add(model)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session):
        result = yield
        self.state.complete = True  # not reached when Ctrl-C or an error ends the loop
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int):
        """Before syrupy's finish: an incomplete session deletes and advises nothing."""
        why = _incomplete(session, exitstatus, self.state.complete)
        option = self.config.option
        # snapshots are in play: a test uses them, or this is the xdist controller (it collects
        # nothing itself, and is where syrupy deletes)
        in_play = self.state.uses_snapshots or not self.state.items
        if (why and in_play and not hasattr(self.config, "workerinput")
                and not getattr(option, "disable_unused_snapshots", True)):
            option.disable_unused_snapshots = True
            self.state.note = (
                f"the run did not complete ({why}), so no snapshot is judged unused and none "
                f"is deleted (mechtests turned syrupy's unused detection off for this run); "
                f"snapshots are only written for tests that passed")
        return (yield)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.state.held_back:
            terminalreporter.write_line(
                f"mechtests: {len(self.state.held_back)} heatmap snapshot(s) not written because "
                f"their test did not pass (the committed file is unchanged): "
                + ", ".join(self.state.held_back[:5])
                + (" ..." if len(self.state.held_back) > 5 else ""))
        if self.state.note:
            terminalreporter.write_line(f"mechtests: {self.state.note}")


def _incomplete(session: pytest.Session, exitstatus: int, loop_completed: bool) -> str:
    """Why a session did not complete (empty when it did)."""
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        return "interrupted"
    if exitstatus == pytest.ExitCode.INTERNAL_ERROR:
        return "internal error"
    if session.shouldfail or session.shouldstop:
        return str(session.shouldfail or session.shouldstop)
    if session.testsfailed:
        return f"{session.testsfailed} failed"
    if not loop_completed:
        return "the test loop did not finish"
    return ""
