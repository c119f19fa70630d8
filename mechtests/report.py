"""What held: a claims x checkpoints report written at the end of every claims run.

Each claim test (a test with a ``claim`` marker) gets one cell per model it ran against: held,
failed (measured value against threshold), skipped (with the reason), or error. Tests attach what
they measured and their heatmaps with the ``record`` fixture::

    record.check(score, 0.5, op=">=", what="name-mover score")   # records, asserts with a message
    record.heatmap(result)                                        # drawn side by side per model

Everything travels in ``item.user_properties`` as plain JSON, so it crosses pytest-xdist workers.
When the run finishes (controller only), one new directory is written, atomically::

    reports/run-20261121-153000/  report.html (self-contained)  report.md  report.json  images/

Nothing is written when no claim test ran, with ``--no-report``, or when the run was
interrupted (Ctrl-C, ``-x``/``--maxfail``, an internal error). Earlier reports are kept.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import operator
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mechtests.result import Result

PREFIX = "mechtests."  # user_properties names this plugin owns
OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
# worst first: error (a crash: a bug, not a finding), failed (the claim's assertion), xpassed,
# inconclusive (the effect too small to judge), held, xfailed, skipped (with the true reason)
OUTCOMES = ("error", "failed", "xpassed", "inconclusive", "held", "xfailed", "skipped")
KINDS = ("evidence", "sanity")  # a measurement is evidence for the claim, or a sanity check
MAX_DRAWN = 100  # heatmaps with more labels than this on an axis are not drawn (values in JSON)


# -- what a test records ---------------------------------------------------------------------------
class Record:
    """Attach measurements and heatmaps to the running test (the ``record`` fixture)."""

    def __init__(self, node: pytest.Item):
        self._node = node

    def measured(self, value: Any, threshold: float, op: str = ">=", what: str = "",
                 kind: str = "evidence") -> bool:
        """Record ``value op threshold`` (e.g. score >= 0.5) and return whether it holds.
        ``kind``: ``"evidence"`` for the claim, or a ``"sanity"`` check that holds by
        construction or guards the measurement (reported as such, never as evidence)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        value, threshold = float(value), float(threshold)
        held = bool(OPS[op](value, threshold))
        self._node.user_properties.append((PREFIX + "measured", {
            "what": what, "value": value, "threshold": threshold, "op": op, "held": held,
            "kind": kind}))
        return held

    def components(self, names: Any, breaks: tuple[str, ...] = ("qk", "ov"),
                   index_free: bool = False, together: bool = False) -> None:
        """Name the components whose mechanism the claim asserts (``"L.H"``, ``"attn_L"``,
        ``"mlp_L"``, ``"embed"``), for ``--mutate``: each is broken in turn (its attention,
        ``"qk"``, and its output, ``"ov"``, as listed in ``breaks``) and the claim must fail.
        ``index_free``: the claim finds its heads itself rather than naming them by index, so a
        renumbering of the heads must leave its values unchanged. ``together``: the claim is
        about the set (some head does X), so the set is broken at once, not one at a time."""
        names = [str(n) for n in ([names] if isinstance(names, str) else names)]
        self._node.user_properties.append((PREFIX + "components", {
            "components": names, "breaks": list(breaks), "index_free": bool(index_free),
            "together": bool(together)}))

    def check(self, value: Any, threshold: float, op: str = ">=", what: str = "") -> None:
        """``measured``, then fail the test with the numbers if it does not hold."""
        __tracebackhide__ = True
        if not self.measured(value, threshold, op, what):
            raise AssertionError(f"{what or 'measured value'} = {float(value):.4g}, "
                                 f"needs {op} {float(threshold):.4g}")

    def heatmap(self, result: Result, title: str | None = None) -> None:
        """Attach a heatmap; the report draws it next to the other models' heatmap of this title."""
        if not isinstance(result, Result):
            raise TypeError(f"record.heatmap takes a mechtests Result, got {type(result).__name__}")
        self._node.user_properties.append((PREFIX + "heatmap", {
            "title": title or result.name, "result": _plain(result.to_json())}))


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Record:
    """Record what a claim test measured (and its heatmaps) for the run's report."""
    return Record(request.node)


def _plain(obj: Any) -> Any:
    """JSON-able copy (meta may hold anything): unknown objects become their str()."""
    return json.loads(json.dumps(obj, default=str))


# -- what the plugin gathers per test --------------------------------------------------------------
@dataclass
class TestResult:
    """One claim test's outcome, as gathered from its reports (on the xdist controller too)."""

    nodeid: str
    claim: str
    source: str = ""
    model: str | None = None
    outcome: str = "skipped"
    reason: str = ""
    duration: float = 0.0
    subject: dict[str, Any] = field(default_factory=dict)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    heatmaps: list[dict[str, Any]] = field(default_factory=list)
    mutation: dict[str, Any] | None = None  # this test's kill matrix under --mutate
    unavailable: str = ""  # the full how-to when the model's weights are not on this machine

    def summary(self) -> str:
        """One line: what was measured against what, or why it failed, errored, was
        inconclusive or skipped. A test that failed or errored for a reason other than a
        measurement (snapshot drift, an exception after the measurements) shows that reason,
        never the measurements that held."""
        failing = [m for m in self.measurements if not m["held"]]
        if self.outcome in ("failed", "xfailed") and failing:
            return "; ".join(_measure_text(m) for m in failing)
        if self.outcome in ("held", "xpassed") and self.measurements:
            shown = [m for m in self.measurements if m.get("kind", "evidence") == "evidence"]
            return "; ".join(_measure_text(m) for m in shown or self.measurements)
        return self.reason


def _measure_text(m: dict[str, Any]) -> str:
    what = f"{m['what']} " if m.get("what") else ""
    sanity = " [sanity check]" if m.get("kind") == "sanity" else ""
    return f"{what}{m['value']:.4g} (needs {m['op']} {m['threshold']:.4g}){sanity}"


def _phase_reason(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return str(report.wasxfail or "expected to fail")
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, message)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) or str(longrepr or "")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:300]


def _update(res: TestResult, report: pytest.TestReport) -> None:
    """Fold one phase's report into the test's outcome: held, failed (the claim's assertion),
    error (any other exception, or a setup/teardown failure), inconclusive (the effect-size
    guard), skipped (with its reason); xfailed/xpassed as pytest has them."""
    res.duration += float(getattr(report, "duration", 0.0) or 0.0)
    props = [(k, v) for k, v in report.user_properties if str(k).startswith(PREFIX)]
    res.measurements = [v for k, v in props if k == PREFIX + "measured"]
    res.heatmaps = [v for k, v in props if k == PREFIX + "heatmap"]
    for k, v in props:
        if k == PREFIX + "subject":
            res.subject = v
        if k == PREFIX + "mutation":
            res.mutation = v
    marked = getattr(report, "mechtests_outcome", None)  # set by the plugin's makereport
    if getattr(report, "mechtests_unavailable", None):
        res.unavailable = str(report.mechtests_unavailable)
    if report.when == "setup":
        if report.failed:
            res.outcome, res.reason = "error", "setup: " + _phase_reason(report)
        elif report.skipped:
            xfail = hasattr(report, "wasxfail")
            res.outcome, res.reason = ("xfailed" if xfail else "skipped"), _phase_reason(report)
            if res.unavailable:  # the how-to is one note per model, not one per test
                res.reason = "the model's weights are not on this machine (see the note)"
    elif report.when == "call":
        if report.passed:
            res.outcome = "xpassed" if hasattr(report, "wasxfail") else "held"
            res.reason = ""
        elif report.failed:
            res.outcome = "error" if marked == "error" else "failed"
            res.reason = _phase_reason(report)
        elif marked == "inconclusive":
            res.outcome, res.reason = "inconclusive", _phase_reason(report).removeprefix(
                "Inconclusive: ")
        else:
            xfail = hasattr(report, "wasxfail")
            res.outcome, res.reason = ("xfailed" if xfail else "skipped"), _phase_reason(report)
    elif report.when == "teardown" and report.failed and res.outcome not in ("failed", "error"):
        res.outcome, res.reason = "error", "teardown: " + _phase_reason(report)


# -- the pytest plugin -----------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mechtests-report", "mechtests report")
    group.addoption("--report-dir", default=None, metavar="DIR",
                    help="where each claims run writes its report directory run-YYYYmmdd-HHMMSS/ "
                         "(default: <rootdir>/reports)")
    group.addoption("--no-report", action="store_true", default=False,
                    help="do not write a claims report at the end of the run")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(ReportPlugin(config), "mechtests-report-plugin")


class ReportPlugin:
    """Gathers claim outcomes from test reports and writes the report when the run finishes."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.results: dict[str, TestResult] = {}
        self.started = dt.datetime.now().astimezone()
        self.written: Path | None = None
        self.note = ""

    # -- on every process (xdist workers included): tag claim tests --
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        from mechtests.snapshot import model_of

        for item in items:
            marker = item.get_closest_marker("claim")
            if marker is None:
                continue
            claim = {"id": str(marker.kwargs.get("id") or item.originalname),
                     "source": str(marker.kwargs.get("source") or "")}
            item.user_properties.append((PREFIX + "claim", claim))
            item.user_properties.append((PREFIX + "model", model_of(item)))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        """Note the loaded subject's name, shape, device and dtype (what actually ran)."""
        subject = getattr(item, "funcargs", {}).get("subject")
        if subject is None or item.get_closest_marker("claim") is None:
            return
        info: dict[str, Any] = {"spec": str(getattr(subject, "spec", "")),
                                "name": str(getattr(subject, "name", ""))}
        try:
            info["shape"] = str(subject.shape)
            param = next(subject.model.parameters())
            info["device"], info["dtype"] = str(param.device), str(param.dtype).removeprefix(
                "torch.")
        except Exception:  # a partial description is fine: this is for the report only
            pass
        item.user_properties.append((PREFIX + "subject", info))

    # -- on the controller (or the only process) --
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict((k, v) for k, v in report.user_properties if str(k).startswith(PREFIX))
        claim = props.get(PREFIX + "claim")
        if not claim:
            return
        res = self.results.get(report.nodeid)
        if res is None:
            res = self.results[report.nodeid] = TestResult(
                report.nodeid, claim["id"], claim.get("source", ""), props.get(PREFIX + "model"))
        _update(res, report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if hasattr(self.config, "workerinput") or self.config.getoption("--no-report"):
            return
        if not self.results:
            return
        stopped = session.shouldfail or session.shouldstop
        if exitstatus in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR) or stopped:
            self.note = "run interrupted or stopped early: no report written"
            return
        try:
            self.written = write_report(list(self.results.values()), self.settings(exitstatus),
                                        self.report_dir())
        except Exception as exc:  # a broken report must not hide the test results
            self.note = f"report not written: {type(exc).__name__}: {exc}"

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.results and not hasattr(self.config, "workerinput"):
            for line in summary_lines(list(self.results.values())):
                terminalreporter.write_line(line)
        if self.written is not None:
            terminalreporter.write_line(f"mechtests report: {self.written / 'report.html'} "
                                        "(and report.md, report.json)")
        elif self.note:
            terminalreporter.write_line(f"mechtests: {self.note}")

    def report_dir(self) -> Path:
        given = self.config.getoption("--report-dir")
        if given is None:
            return Path(self.config.rootpath) / "reports"
        return Path(self.config.invocation_params.dir) / given

    def settings(self, exitstatus: int) -> dict[str, Any]:
        cfg = self.config
        results = list(self.results.values())
        models = _ordered_models(results, cfg.getoption("--model", None))
        subjects = {r.model: r.subject for r in results if r.subject and r.model}
        return {
            "date": self.started.isoformat(timespec="seconds"),
            "duration_s": round((dt.datetime.now().astimezone() - self.started).total_seconds(), 1),
            "command": shlex.join(["pytest", *cfg.invocation_params.args]),
            "models": models,
            "device": cfg.getoption("--device", None) or "default (cuda if available, else cpu)",
            "devices_used": sorted({s["device"] for s in subjects.values() if "device" in s}),
            "subjects": {m: ", ".join(str(subjects[m][k]) for k in ("shape", "device", "dtype")
                                      if k in subjects[m]) for m in models if m in subjects},
            "dtype": cfg.getoption("--dtype", None),
            "seed": cfg.getoption("--seed", None),
            "xdist_workers": cfg.getoption("numprocesses", None),
            "exit_status": int(exitstatus),
            "versions": _versions(),
            "git_commit": _git_commit(Path(cfg.rootpath)),
            "platform": platform.platform(),
        }


def summary_lines(results: list[TestResult]) -> list[str]:
    """The claims' verdicts for the terminal: the five outcomes counted, why each error and
    inconclusive, one line per model whose weights are absent, and ``--mutate``'s kill matrix."""
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    out = ["", "mechtests claims: " + ", ".join(
        f"{counts[o]} {o}" for o in ("held", "failed", "error", "inconclusive", "skipped")
        + ("xfailed", "xpassed")[: 2 if counts["xfailed"] or counts["xpassed"] else 0])]
    for r in results:
        if r.outcome in ("error", "inconclusive"):
            out.append(f"  {r.outcome.upper()} {r.nodeid}: {r.reason}")
    for note in notes(results):
        out.append(f"  model {note['model']}: {note['tests']} claim tests skipped. {note['note']}")
    mut = mutation(results)
    if mut:
        out.append("mechtests --mutate: kill matrix (mutant: expected -> outcome; "
                   "x = not what a discriminating claim does)")
        for claim, m in mut.items():
            comps = f" [{', '.join(m['components'])}]" if m.get("components") else ""
            out.append(f"  {claim}{comps}: {m['verdict']}")
            cells = [f"{name}: {c['expected']}->{c['outcome']}{'' if c['ok'] else ' x'}"
                     for name, c in m["matrix"].items()]
            if cells:
                out.append("      " + "; ".join(cells))
    return out


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("mechtests", "torch", "transformer_lens", "transformers", "pytest"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _git_commit(root: Path) -> str | None:
    try:
        got = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, timeout=5,
                             capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return (got.stdout.strip() or None) if got.returncode == 0 else None


# -- building the report ---------------------------------------------------------------------------
NO_MODEL = "(no model)"


def _ordered_models(results: list[TestResult], asked: list[str] | None) -> list[str]:
    seen = {r.model if r.model is not None else NO_MODEL for r in results}
    first = [m for m in (asked or []) if m in seen]
    return first + sorted(seen - set(first))


def build(results: list[TestResult], settings: dict[str, Any]) -> dict[str, Any]:
    """The report as plain data: settings, models, and per claim one cell per model."""
    models = settings.get("models") or _ordered_models(results, None)
    claims: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: (r.claim, r.nodeid)):
        claim = claims.setdefault(r.claim, {"id": r.claim, "source": r.source, "cells": {}})
        claim["source"] = claim["source"] or r.source
        model = r.model if r.model is not None else NO_MODEL
        cell = claim["cells"].setdefault(model, {"outcome": "", "text": "", "tests": []})
        cell["tests"].append(asdict(r))
    for claim in claims.values():
        for cell in claim["cells"].values():
            tests = [TestResult(**t) for t in cell["tests"]]
            worst = min(OUTCOMES.index(t.outcome) for t in tests)
            cell["outcome"] = OUTCOMES[worst]
            texts = list(dict.fromkeys(t.summary() for t in tests
                                       if t.outcome == cell["outcome"] and t.summary()))
            if len(tests) > 1:
                counts = ", ".join(f"{n} {o}" for o in OUTCOMES
                                   if (n := sum(t.outcome == o for t in tests)))
                texts.append(f"({counts})")
            cell["text"] = "; ".join(texts)
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    return {"schema": 1, "settings": settings, "models": models, "counts": counts,
            "claims": list(claims.values()), "notes": notes(results),
            "mutation": mutation(results)}


def notes(results: list[TestResult]) -> list[dict[str, Any]]:
    """One note per model whose weights are not on this machine (not one per test)."""
    by_model: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.unavailable:
            note = by_model.setdefault(r.model or NO_MODEL, {
                "model": r.model or NO_MODEL, "note": r.unavailable, "tests": 0})
            note["tests"] += 1
    return list(by_model.values())


def mutation(results: list[TestResult]) -> dict[str, Any]:
    """``--mutate``'s result per claim id: verdict, components and kill matrix (each mutant:
    expected "fail" | "hold" | "same", the outcome, ok), merged over the claim's tests."""
    from mechtests.mutate import merge

    by_claim: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: (r.claim, r.nodeid)):
        if r.mutation is not None:
            by_claim.setdefault(r.claim, []).append(r.mutation)
    return {claim: merge(entries) for claim, entries in by_claim.items()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


def _draw(data: dict[str, Any], images: Path) -> None:
    """Draw every drawable heatmap to images/, recording the file name in the heatmap's entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used: set[str] = set()
    for claim in data["claims"]:
        lims: dict[str, float] = {}  # one colour scale per heatmap title across the models
        for cell in claim["cells"].values():
            for test in cell["tests"]:
                for heat in test["heatmaps"]:
                    lim = max((abs(v) for v in _flat(heat["result"]["values"])
                               if math.isfinite(v)), default=0.0)
                    lims[heat["title"]] = max(lims.get(heat["title"], 0.0), lim)
        for model, cell in claim["cells"].items():
            for test in cell["tests"]:
                for i, heat in enumerate(test["heatmaps"]):
                    result = Result.from_json(heat["result"])
                    sizes = [len(result.labels[a]) for a in result.axes]
                    if not 1 <= len(sizes) <= 2 or max(sizes) > MAX_DRAWN:
                        heat["image"] = None
                        heat["note"] = f"not drawn ({' x '.join(map(str, sizes))}): see JSON"
                        continue
                    name = f"{_slug(claim['id'])}--{_slug(model)}--{_slug(heat['title'])}"
                    while name in used:
                        name += f"-{i}"
                    used.add(name)
                    fig = result.heatmap(title=f"{model}: {heat['title']}")
                    lim = lims[heat["title"]] or 1.0
                    fig.axes[0].images[0].set_clim(-lim, lim)
                    fig.savefig(images / f"{name}.png", dpi=80)
                    plt.close(fig)
                    heat["image"] = f"images/{name}.png"


def _flat(values: Any) -> list[float]:
    if isinstance(values, list):
        return [x for v in values for x in _flat(v)]
    return [float("nan") if values is None else float(values)]


def _heat_rows(claim: dict[str, Any], models: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Heatmaps grouped by title: [(title, {model: heatmap entry})], in first-seen order.

    When a claim has several tests per model, the title is prefixed with the test function and
    repeated titles are numbered, so each row lines the same heatmap up across models.
    """
    rows: dict[str, dict[str, Any]] = {}
    for model in models:
        cell = claim["cells"].get(model)
        seen: dict[str, int] = {}
        for test in cell["tests"] if cell else []:
            for heat in test["heatmaps"]:
                title = heat["title"]
                if len(cell["tests"]) > 1:
                    func = test["nodeid"].split("::")[-1].split("[")[0]
                    title = f"{func}: {title}"
                seen[title] = seen.get(title, 0) + 1
                key = title if seen[title] == 1 else f"{title} #{seen[title]}"
                rows.setdefault(key, {})[model] = heat
    return list(rows.items())


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _short(text: str, n: int = 120) -> str:
    """Table cells stay short; the claim's section below has the full text."""
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def _setting(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_setting(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def render_md(data: dict[str, Any]) -> str:
    s, models = data["settings"], data["models"]
    out = [f"# mechtests report: {s['date']}", "", "## What held", ""]
    out.append("| claim | " + " | ".join(_md_cell(m) for m in models) + " |")
    out.append("|---" * (len(models) + 1) + "|")
    for claim in data["claims"]:
        cells = []
        for m in models:
            cell = claim["cells"].get(m)
            text = f": {_short(cell['text'])}" if cell and cell["text"] else ""
            cells.append("n/a" if cell is None else _md_cell(cell["outcome"] + text))
        out.append(f"| {_md_cell(claim['id'])} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{n} {o}" for o, n in data["counts"].items() if n)
    out += ["", f"Tests: {counts}.", "", "## Settings", ""]
    for key, value in s.items():
        out.append(f"- {key}: `{_setting(value)}`")
    for claim in data["claims"]:
        out += ["", f"## {claim['id']}", ""]
        if claim["source"]:
            out += [f"Source: {claim['source']}", ""]
        for m in models:
            cell = claim["cells"].get(m)
            if cell:
                for t in cell["tests"]:
                    line = f"- `{m}` `{t['nodeid']}`: **{t['outcome']}**"
                    detail = "; ".join(_measure_text(x) for x in t["measurements"]) or t["reason"]
                    out.append(line + (f": {_md_cell(detail)}" if detail else ""))
        rows = _heat_rows(claim, models)
        if rows:
            out += ["", "| heatmap | " + " | ".join(models) + " |", "|---" * (len(models) + 1)
                    + "|"]
            for title, by_model in rows:
                imgs = []
                for m in models:
                    heat = by_model.get(m)
                    imgs.append("" if heat is None else
                                f"![{_md_cell(m)}]({heat['image']})" if heat.get("image")
                                else _md_cell(heat.get("note", "")))
                out.append(f"| {_md_cell(title)} | " + " | ".join(imgs) + " |")
    return "\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}.held{background:#dff5df}.failed,.error{background:#f9d6d5}
.skipped,.xfailed{background:#eee;color:#555}.xpassed{background:#fff3c4}
img{max-width:480px}code{font-size:90%}"""


def render_html(data: dict[str, Any], images: Path) -> str:
    e = html.escape
    s, models = data["settings"], data["models"]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>mechtests report "
           f"{e(s['date'])}</title><style>{CSS}</style></head><body>",
           f"<h1>mechtests report: {e(s['date'])}</h1><h2>What held</h2><table><tr><th>claim</th>"]
    out += [f"<th>{e(m)}</th>" for m in models] + ["</tr>"]
    for claim in data["claims"]:
        out.append(f"<tr><td><a href='#{e(_slug(claim['id']))}'>{e(claim['id'])}</a></td>")
        for m in models:
            cell = claim["cells"].get(m)
            if cell is None:
                out.append("<td>n/a</td>")
            else:
                text = f": {e(_short(cell['text']))}" if cell["text"] else ""
                out.append(f"<td class='{cell['outcome']}'><b>{cell['outcome']}</b>{text}</td>")
        out.append("</tr>")
    out.append("</table>")
    counts = ", ".join(f"{n} {o}" for o, n in data["counts"].items() if n)
    out.append(f"<p>Tests: {e(counts)}.</p><h2>Settings</h2><table>")
    for key, value in s.items():
        out.append(f"<tr><th>{e(key)}</th><td><code>{e(_setting(value))}</code></td></tr>")
    out.append("</table>")
    for claim in data["claims"]:
        out.append(f"<h2 id='{e(_slug(claim['id']))}'>{e(claim['id'])}</h2>")
        if claim["source"]:
            out.append(f"<p>Source: {e(claim['source'])}</p>")
        out.append("<ul>")
        for m in models:
            for t in (claim["cells"].get(m) or {"tests": []})["tests"]:
                detail = "; ".join(_measure_text(x) for x in t["measurements"]) or t["reason"]
                out.append(f"<li><code>{e(m)}</code> <code>{e(t['nodeid'])}</code>: "
                           f"<b class='{t['outcome']}'>{t['outcome']}</b>"
                           + (f": {e(detail)}" if detail else "") + "</li>")
        out.append("</ul>")
        rows = _heat_rows(claim, models)
        if rows:
            out.append("<table><tr><th>heatmap</th>" + "".join(f"<th>{e(m)}</th>" for m in models)
                       + "</tr>")
            for title, by_model in rows:
                out.append(f"<tr><td>{e(title)}</td>")
                for m in models:
                    heat = by_model.get(m)
                    if heat is None:
                        out.append("<td></td>")
                    elif heat.get("image"):
                        png = (images.parent / heat["image"]).read_bytes()
                        b64 = base64.b64encode(png).decode()
                        out.append(f"<td><img alt='{e(m)}: {e(title)}' "
                                   f"src='data:image/png;base64,{b64}'></td>")
                    else:
                        out.append(f"<td>{e(heat.get('note', ''))}</td>")
                out.append("</tr>")
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def _finite(obj: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_report(results: list[TestResult], settings: dict[str, Any], parent: Path) -> Path:
    """Write ``parent/run-<timestamp>/`` whole or not at all; returns the new directory.

    Everything goes into a hidden temporary directory beside it, renamed into place at the end;
    on any error (or Ctrl-C) the temporary directory is removed and nothing else is touched.
    """
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".run-", suffix=".partial", dir=parent))
    try:
        data = build(results, settings)
        images = tmp / "images"
        images.mkdir()
        _draw(data, images)
        (tmp / "report.md").write_text(render_md(data), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(data, images), encoding="utf-8")
        (tmp / "report.json").write_text(
            json.dumps(_finite(data), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        stamp = dt.datetime.fromisoformat(settings["date"]).strftime("%Y%m%d-%H%M%S") \
            if "date" in settings else dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        final, n = parent / f"run-{stamp}", 1
        while True:  # never overwrite an earlier report (two runs in one second)
            try:
                if final.exists():
                    raise FileExistsError(final)
                os.rename(tmp, final)
                return final
            except FileExistsError:
                n += 1
                final = parent / f"run-{stamp}-{n}"
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
