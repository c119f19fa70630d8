"""Heatmap snapshots: syrupy snapshots of ``Result`` objects, compared with a numeric tolerance.

Each snapshot is one reviewable text file (JSON, one row of values per line) next to the test::

    claims/__heatmaps__/test_ioi/test_name_movers[gpt2][head_attr].heatmap.txt

Usage in a claim (``heatmap_snapshot`` is a fixture of this plugin)::

    assert heatmap_snapshot(name="head_attr") == result                    # atol 1e-3
    assert heatmap_snapshot(name="head_attr") == within(result, atol=1e-2)

Values match when ``|actual - expected| <= atol + rtol * |expected|`` in every cell; axes, labels
and shape must match exactly. A snapshot that matches within tolerance counts as a match, so
``--snapshot-update`` leaves its file alone; only snapshots that really changed are rewritten.

Models that did not run here (weights missing, so their tests skipped, or not asked for with
``--model``) keep their snapshots: each file records its model, and a file is only discovered by
syrupy (and so only ever reported unused or deleted) when its model got at least one test through
its call phase in this session and its test module was collected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from mechtests.result import Result

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
        if math.isnan(g) or math.isnan(w):
            ok, diff = math.isnan(g) and math.isnan(w), math.inf
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


# -- the syrupy extension --------------------------------------------------------------------------
@dataclass
class _Models:
    """Per session: each test's model, and the models that got a test through its call."""

    of_node: dict[str, str | None]
    active: set[str]
    modules: set[str]


_SESSIONS: list[_Models] = []  # one per running session (pytester nests sessions in-process)


class HeatmapExtension(SingleFileSnapshotExtension):
    """One ``.heatmap.txt`` file per snapshot, matched within a numeric tolerance.

    Files live in ``__heatmaps__/<test module>/`` beside the test module, not in
    ``__snapshots__``: syrupy's default (amber) extension treats every foreign file in
    ``__snapshots__`` as an unknown collection it may delete, which would undo the protection of
    snapshots for models that did not run.
    """

    file_extension = "heatmap.txt"
    snapshot_dirname = "__heatmaps__"
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
        """Only files whose test module was collected and whose model ran a test in this session.

        The others (a model whose weights are missing, or not asked for) are invisible to syrupy,
        so they are never reported unused nor deleted by ``--snapshot-update``.
        """
        if not super().owns_snapshot_collection(filepath=filepath, test_location=test_location):
            return False
        if not _SESSIONS:
            return True
        session = _SESSIONS[-1]
        path = Path(filepath)
        module = path.parent.parent.parent / f"{path.parent.name}.py"
        if str(module.resolve()) not in session.modules:  # e.g. --ignore'd: not ours to judge
            return False
        try:
            model = loads(path.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError):
            return True
        return model is None or model in session.active


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


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSIONS.append(_Models({}, set(), set()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if _SESSIONS:
        _SESSIONS[-1].of_node.update({item.nodeid: model_of(item) for item in items})
        _SESSIONS[-1].modules.update(str(Path(item.path).resolve()) for item in items)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and not report.skipped and _SESSIONS:
        model = _SESSIONS[-1].of_node.get(report.nodeid)
        if model is not None:
            _SESSIONS[-1].active.add(model)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Runs after syrupy's own (tryfirst) finish, which discovers snapshots with this state."""
    if _SESSIONS:
        _SESSIONS.pop()
