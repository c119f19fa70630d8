"""What held: a claims x checkpoints report written at the end of every claims run.

Each claim test (a test with a ``claim`` marker) gets one cell per model it ran against: held,
failed (measured value against threshold), skipped (with the reason), or error. Tests attach what
they measured and their heatmaps with the ``record`` fixture::

    record.check(score, 0.5, op=">=", what="name-mover score")   # records, asserts with a message
    record.heatmap(result)                                        # drawn side by side per model

Everything travels in ``item.user_properties`` as plain JSON, so it crosses pytest-xdist workers.
When the run finishes (controller only), one new directory is written, atomically::

    reports/run-20261121-153000/  report.html (self-contained)  report.md  report.json  images/

Nothing is written when no claim test ran or every claim skipped (nothing was checked), with
``--no-report``, or when the run was interrupted (Ctrl-C, ``-x``/``--maxfail``, an internal
error). Earlier reports are kept. The renderers (HTML, Markdown, figures) are in ``render.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mechtests.core.result import Result
from mechtests.core.sequence import checkpoint_info, identical_weights
from mechtests.suite import render
from mechtests.suite.claims import OPS

PREFIX = "mechtests."  # user_properties names this plugin owns
# worst first: error (a crash: a bug, not a finding), failed (the claim's assertion), xpassed,
# inconclusive (the effect too small to judge), moved (held on other components), held,
# xfailed, skipped (with the true reason)
OUTCOMES = render.ORDER
KINDS = ("evidence", "sanity")  # a measurement is evidence for the claim, or a sanity check


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

    def cast(self, role: str, means: str, expected: Any, found: Any, moved: dict[str, str],
             vacant: Any = ()) -> None:
        """Record a role resolved on the subject (``mechtests.suite.roles.cast``): the
        reference's components, who plays the role here, and who moved where."""
        self._node.user_properties.append((PREFIX + "cast", {
            "role": role, "means": means, "expected": list(expected), "found": list(found),
            "moved": dict(moved), "vacant": list(vacant)}))

    def split(self, family: str, seed: int, discover: Any, confirm: Any,
              dropped: Any = ()) -> None:
        """Record how a family was split for a cast anew: the seed, the prompts the components
        were found on and the disjoint ones the mechanism was confirmed on (indices into the
        family as fitted to the tokenizer), and the prompts the tokenizer could not express."""
        self._node.user_properties.append((PREFIX + "split", {
            "family": family, "seed": int(seed), "discover": [int(i) for i in discover],
            "confirm": [int(i) for i in confirm], "dropped": [str(d) for d in dropped]}))

    def beside(self, question: str, outcome: str, reason: str = "") -> None:
        """Record the answer to the question that did not decide the verdict: ``"strict"``
        (are the very same heads doing it) beside a role verdict, or ``"role"`` beside a
        ``--strict-components`` one."""
        self._node.user_properties.append((PREFIX + "beside", {
            "question": question, "outcome": outcome, "reason": reason}))

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Measurements made inside are kept out of the verdict's (``record.beside``'s
        question is answered there)."""
        node = self._node
        self._node = SimpleNamespace(user_properties=[], config=getattr(node, "config", None))
        try:
            yield
        finally:
            self._node = node

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
        entry = {"title": title or result.name, "result": _plain(result.to_json())}
        node = self._node
        callspec = getattr(node, "callspec", None)
        if callspec is not None and getattr(node, "path", None) is not None:
            from mechtests.suite.snapshot import model_of

            ref = render.reference_heatmap(Path(node.path), node.originalname, callspec.id,
                                           model_of(node), entry["result"])
            if ref is not None:  # the committed snapshot the report draws first
                entry["reference"] = ref
        node.user_properties.append((PREFIX + "heatmap", entry))


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
    casts: list[dict[str, Any]] = field(default_factory=list)  # roles resolved (roles.cast)
    moved: dict[str, str] = field(default_factory=dict)  # {"3.3": "3.0"}: held on other heads
    beside: dict[str, Any] | None = None  # the other question's answer (strict or role)
    splits: list[dict[str, Any]] = field(default_factory=list)  # a cast anew's halves
    unavailable: str = ""  # the full how-to when the model's weights are not on this machine

    def summary(self) -> str:
        """One line: what was measured against what, or why it failed, errored, was
        inconclusive or skipped. A test that failed or errored for a reason other than a
        measurement (snapshot drift, an exception after the measurements) shows that reason,
        never the measurements that held."""
        failing = [m for m in self.measurements if not m["held"]]
        if self.outcome in ("failed", "xfailed") and failing:
            return "; ".join(_measure_text(m) for m in failing)
        if self.outcome in ("held", "moved", "xpassed") and self.measurements:
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
    res.casts = [v for k, v in props if k == PREFIX + "cast"]
    res.moved = {a: b for c in res.casts for a, b in c.get("moved", {}).items()}
    res.beside = next((v for k, v in props if k == PREFIX + "beside"), None)
    res.splits = [v for k, v in props if k == PREFIX + "split"]
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
            res.outcome = "xpassed" if hasattr(report, "wasxfail") else \
                ("moved" if res.moved else "held")
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
        self.loop_done = False  # the test loop returned normally (not Ctrl-C, not an error)
        self._checkpoints: dict[str, dict[str, Any]] | None = None

    def asked(self) -> list[str]:
        """The ``--model`` specs, sequences expanded (ordered by step), each once."""
        from mechtests.core.sequence import unique_specs

        return unique_specs(self.config.getoption("--model", None) or [])

    # -- on every process (xdist workers included): tag claim tests --
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        from mechtests.suite.snapshot import model_of

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

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session):
        result = yield
        self.loop_done = True  # not reached when Ctrl-C or an error ends the loop
        return result

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Write the report whole, or say why not; a report that cannot be written fails the run.

        A run counts as complete only when the test loop returned normally and nothing stopped
        it: the exit status alone is not trusted (it stays 0 when pytest's own interrupt
        handling fails).
        """
        if hasattr(self.config, "workerinput") or self.config.getoption("--no-report"):
            return
        if not self.results:
            return
        if all(r.outcome == "skipped" for r in self.results.values()):
            self.note = "every claim skipped (nothing was checked): no report written"
            return
        stopped = session.shouldfail or session.shouldstop
        if exitstatus in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR) or stopped \
                or not self.loop_done:
            self.note = "run interrupted or stopped early: no report written"
            return
        try:
            settings = self.settings(exitstatus)
            self.written = write_report(list(self.results.values()), settings,
                                        self.report_dir(), self.checkpoints(settings["models"]))
        except KeyboardInterrupt:
            self.note = ("interrupted while writing the report: nothing written (the partial "
                         "directory was removed)")
            session.exitstatus = pytest.ExitCode.INTERRUPTED
        except Exception as exc:  # a broken report must not hide the test results
            self.note = (f"report NOT written: {type(exc).__name__}: {exc}. Make "
                         f"{self.report_dir()} a writable directory, or pass --report-dir DIR "
                         f"(--no-report turns reports off)")
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

    def checkpoints(self, models: list[str]) -> dict[str, dict[str, Any]]:
        """Each model's checkpoint record (step, loss, weight hash), computed once per run;
        models whose files are not on this machine have none."""
        if self._checkpoints is None:
            self._checkpoints = checkpoint_records(self.config.getoption("--model", None) or [],
                                                   models)
        return self._checkpoints

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.results and not hasattr(self.config, "workerinput"):
            for line in summary_lines(list(self.results.values())):
                terminalreporter.write_line(line)
            models = _ordered_models(list(self.results.values()), self.asked())
            for warning in identical_weights(self.checkpoints(models)):
                terminalreporter.write_line(f"mechtests WARNING: {warning}", yellow=True,
                                            bold=True)
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
        models = _ordered_models(results, self.asked())
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
    shown = ("held",) + (("moved",) if counts["moved"] else ()) + (
        "failed", "error", "inconclusive", "skipped") + (
        ("xfailed", "xpassed") if counts["xfailed"] or counts["xpassed"] else ())
    out = ["", "mechtests claims: " + ", ".join(
        f"{counts[o]} {render.WORDS[o] if o == 'moved' else o}" for o in shown)]
    for r in results:
        if r.outcome in ("error", "inconclusive"):
            out.append(f"  {r.outcome.upper()} {r.nodeid}: {r.reason}")
        if r.moved or r.beside:
            where = ", ".join(f"{a} -> {b}" for a, b in r.moved.items())
            line = f"  {render.WORDS.get(r.outcome, r.outcome).upper()} {r.nodeid}"
            line += f": {where}" if where else ""
            if r.beside:
                line += f" ({render.beside_text(r.beside)})"
            out.append(line)
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
SCHEMA = 2  # report.json's layout; reports merge only with the same schema and suite version


def checkpoint_records(given: list[str], models: list[str]) -> dict[str, dict[str, Any]]:
    """``{model: {path, step, loss, sha256, files}}`` for each model whose files are here.
    A checkpoint from a sequence (``--model DIR_OF_CHECKPOINTS`` or a glob) takes its step from
    its name when its training.json has none."""
    from mechtests.core.models import CheckpointError, ModelUnavailable, resolve
    from mechtests.core.sequence import expand, is_sequence

    in_sequence = set()
    for spec in given:
        if is_sequence(spec):
            try:
                in_sequence.update(expand(spec))
            except CheckpointError:
                pass
    out = {}
    for m in models:
        try:
            path = resolve(m).path
            out[m] = checkpoint_info(path, in_sequence=m in in_sequence)
        except (CheckpointError, ModelUnavailable, OSError):
            continue  # not on this machine, or not a checkpoint: its tests say why
    return out


def _ordered_models(results: list[TestResult], asked: list[str] | None) -> list[str]:
    seen = {r.model if r.model is not None else NO_MODEL for r in results}
    first = [m for m in (asked or []) if m in seen]
    return first + sorted(seen - set(first))


def build(results: list[TestResult], settings: dict[str, Any],
          checkpoints: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report as plain data: settings, models, checkpoints (step, loss, weight hash), and
    per claim one cell per model. Checkpoints with steps are ordered by step."""
    models = settings.get("models") or _ordered_models(results, None)
    checkpoints = {m: checkpoints[m] for m in models if m in (checkpoints or {})}
    stepped = [m for m in models if isinstance(checkpoints.get(m, {}).get("step"), int)]
    if len(stepped) == len(models) > 1:
        models = sorted(models, key=lambda m: checkpoints[m]["step"])
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
    return {"schema": SCHEMA, "settings": settings, "models": models, "counts": counts,
            "claims": list(claims.values()), "notes": notes(results),
            "mutation": mutation(results), "checkpoints": checkpoints,
            "warnings": identical_weights(checkpoints)}


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
    by_claim: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: (r.claim, r.nodeid)):
        if r.mutation is not None:
            by_claim.setdefault(r.claim, []).append(r.mutation)
    return {claim: merge_mutations(entries) for claim, entries in by_claim.items()}


def _finite(obj: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _publish(tmp: Path, parent: Path, name: str) -> Path:
    """Rename the finished ``tmp`` to ``parent/name`` (or ``name-2``, ``-3``, ...), never onto
    an existing report: another run may take a name at any moment, so a name that is taken when
    the rename happens (EEXIST/ENOTEMPTY) moves on to the next. The directory gets the usual
    permissions (``0o777 & ~umask``), not the private 0700 of a temporary directory."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for n in range(1, 10_000):
        final = parent / (name if n == 1 else f"{name}-{n}")
        if final.exists() or final.is_symlink():
            continue
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR) \
                    or isinstance(exc, FileExistsError):
                continue  # taken between the check and the rename
            raise
        return final
    raise FileExistsError(f"{parent}: no free name {name}-N for the report (N up to 9999)")


def write_report(results: list[TestResult], settings: dict[str, Any], parent: Path,
                 checkpoints: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``parent/run-<timestamp>/`` whole or not at all; returns the new directory.

    Everything goes into a hidden temporary directory beside it, renamed into place at the end;
    on any error (or Ctrl-C) the temporary directory is removed and nothing else is touched.
    """
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".run-", suffix=".partial", dir=parent))
    try:
        data = build(results, settings, checkpoints)
        images = tmp / "images"
        images.mkdir()
        render.draw(data, images)
        (tmp / "report.md").write_text(render.render_md(data), encoding="utf-8")
        (tmp / "report.html").write_text(render.render_html(data, images), encoding="utf-8")
        (tmp / "report.json").write_text(
            json.dumps(_finite(data), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        stamp = dt.datetime.fromisoformat(settings["date"]).strftime("%Y%m%d-%H%M%S") \
            if "date" in settings else dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return _publish(tmp, parent, f"run-{stamp}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- mutation results (``--mutate``), merged per claim -------------------------------------
def verdict(matrix: dict[str, dict[str, Any]]) -> str:
    """One phrase: ``discriminating``, or the first way the claim falls short."""
    bad = [(n, m) for n, m in matrix.items() if not m["ok"]]
    if not bad:
        return "discriminating"
    name, m = bad[0]
    if m["outcome"] == "error":
        return f"error under {name}"
    if m["expected"] == "fail":
        return ("cannot fail when heads are renumbered" if name == "relabel"
                else f"cannot fail when {name} breaks")
    if m["expected"] == "same":
        return "index-dependent under relabel" if m["outcome"] == "held" else \
            "fragile under relabel"
    if m["expected"] == "moved":
        return "does not follow its heads when renumbered"
    return f"fragile under {name}"


def merge_mutations(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One claim's mutation result from its tests' (kinds, models): a mutant is ok only if it
    was ok in every test that ran it; the matrix keeps the worst outcome and counts."""
    matrix: dict[str, dict[str, Any]] = {}
    notes = []
    components: list[str] = []
    for e in entries:
        if "error" in e:
            notes.append(e["error"])
            continue
        components += [c for c in e.get("components", []) if c not in components]
        for name, m in e["matrix"].items():
            cur = matrix.setdefault(name, {"expected": m["expected"], "outcome": m["outcome"],
                                           "ok": True, "runs": 0, "reasons": []})
            cur["runs"] += 1
            if not m["ok"]:
                if cur["ok"]:
                    cur["outcome"] = m["outcome"]
                cur["ok"] = False
                if m.get("reason"):
                    cur["reasons"].append(m["reason"])
            elif cur["ok"]:
                cur["outcome"] = m["outcome"]
    out: dict[str, Any] = {"components": components, "matrix": matrix}
    if matrix:
        out["verdict"] = verdict(matrix)
    else:
        out["verdict"] = "not run: " + (notes[0] if notes else "no test held on its subject")
    if notes:
        out["notes"] = list(dict.fromkeys(notes))
    return out


# -- merging reports (separate runs, Ray tasks, SLURM array jobs) ---------------------------------
class MergeError(ValueError):
    """Reports that cannot be merged: missing, from another version, or contradicting."""


def load_report(where: Path) -> dict[str, Any]:
    """A run's ``report.json`` (given the file or its run directory), checked to be mergeable."""
    from mechtests import __version__

    where = Path(where)
    f = where / "report.json" if where.is_dir() else where
    if not f.is_file():
        raise MergeError(f"{where}: no report.json there; pass the run directories a claims run "
                         f"wrote (reports/run-YYYYmmdd-HHMMSS/)")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeError(f"{f}: not a readable report ({exc})") from None
    have = ((data.get("settings") or {}).get("versions") or {}).get("mechtests")
    if data.get("schema") != SCHEMA or have != __version__:
        raise MergeError(
            f"{f} was written by mechtests {have or '(unknown version)'} (report schema "
            f"{data.get('schema')}); this is mechtests {__version__} (schema {SCHEMA}). Re-run "
            f"its checkpoints with this version (or merge with the version that wrote it): "
            f"reports from different versions are not comparable")
    return data


def merge_data(reports: list[tuple[str, dict[str, Any]]], command: str = "") -> tuple[
        list[TestResult], dict[str, Any], dict[str, dict[str, Any]]]:
    """(results, settings, checkpoints) of one report combining ``reports`` ((label, data)):
    every test of every run, each once; a test run in two of them, or one checkpoint recorded
    with different weights, is refused."""
    from dataclasses import fields

    keep = {f.name for f in fields(TestResult)}
    results: dict[tuple[str | None, str], tuple[str, TestResult]] = {}
    checkpoints: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    order: list[str] = []
    runs = []
    if not reports:
        raise MergeError("nothing to merge: pass one or more report directories")
    for label, data in reports:
        for claim in data.get("claims", []):
            for cell in claim.get("cells", {}).values():
                for t in cell.get("tests", []):
                    r = TestResult(**{k: v for k, v in t.items() if k in keep})
                    key = (r.model, r.nodeid)
                    if key in results:
                        raise MergeError(f"{r.nodeid} is in both {results[key][0]} and {label}: "
                                         f"each test of each checkpoint may come from one run "
                                         f"only; leave one of them out")
                    results[key] = (label, r)
        for model, info in (data.get("checkpoints") or {}).items():
            if model in checkpoints and checkpoints[model].get("sha256") != info.get("sha256"):
                raise MergeError(f"checkpoint {model} was checked with different weights in "
                                 f"{where[model]} and {label} (sha256 "
                                 f"{str(checkpoints[model].get('sha256'))[:12]} vs "
                                 f"{str(info.get('sha256'))[:12]}): these are not one run's "
                                 f"checkpoints")
            checkpoints.setdefault(model, info)
            where.setdefault(model, label)
        order += [m for m in data.get("models", []) if m not in order]
        s = data.get("settings") or {}
        runs.append({"report": label, **{k: s[k] for k in ("date", "command", "git_commit",
                                                             "devices_used", "duration_s")
                                         if k in s}})
    first = reports[0][1].get("settings") or {}
    settings = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command or "python -m mechtests.suite.report merge",
        "models": order,
        "merged_from": runs,
        **{k: first[k] for k in ("dtype", "seed", "versions") if k in first},
        "devices_used": sorted({d for _, data in reports
                                for d in (data.get("settings") or {}).get("devices_used", [])}),
        "platform": platform.platform(),
    }
    return [r for _, r in results.values()], settings, checkpoints


def merge(parent: Path, sources: list[Path], command: str = "") -> Path:
    """Merge the reports in ``sources`` (run directories) into a new run directory under
    ``parent``; returns it."""
    reports = [(str(src), load_report(src)) for src in sources]
    results, settings, checkpoints = merge_data(reports, command)
    return write_report(results, settings, Path(parent), checkpoints)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m mechtests.suite.report",
        description="Merge claims reports from separate runs (Ray tasks, SLURM array jobs, one "
                    "run per checkpoint) into one report.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge run directories into a new one under OUT")
    m.add_argument("out", type=Path, help="parent directory of the merged run-*/ (like "
                                          "--report-dir)")
    m.add_argument("reports", type=Path, nargs="+", help="run directories (or report.json)")
    a = p.parse_args(argv)
    try:
        written = merge(a.out, a.reports, shlex.join(["python", "-m", "mechtests.suite.report",
                                                      *(argv or sys.argv[1:])]))
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = json.loads((written / "report.json").read_text(encoding="utf-8"))
    for warning in data.get("warnings", []):
        print(f"WARNING: {warning}", file=sys.stderr)
    print(written / "report.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
