"""The pytest plugin: ``--model``/``--device``/``--dtype``, the ``claim`` marker, and subjects.

A claim test takes a ``subject`` fixture and is run once per model: the models named with
``--model`` (repeatable), or else the claim's own reference subjects (``subjects=[...]`` in its
``claim`` marker). Each model loads once per run. A ``--model`` that is not on this machine
stops the run before any test (a typo must not turn CI green on skips) unless
``--allow-missing-models``; a claim's own reference subject that is not here is a skip that says
how to get it. A checkpoint that fails to load is reported in full once, then in one line.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mechtests.core.models import (
    CheckpointError,
    DeviceError,
    ModelUnavailable,
    NoSuchModel,
    check_checkpoint,
    check_device,
    load_model,
    resolve,
    spec_of,
)
from mechtests.suite.claims import Subject

SEED_MAX = 2**64 - 1  # torch.manual_seed's range (non-negative)

# heatmap snapshots (syrupy extension) and the claims x checkpoints report
pytest_plugins = ["mechtests.suite.snapshot", "mechtests.suite.report"]


# Relative agreement of a bfloat16/float16 run with float32 (measured worst cases 3.3% and
# 0.35% of the logit scale, README "Architectures and dtypes"), with headroom.
HALF_PRECISION_RTOL = {"bfloat16": 0.05, "float16": 0.01}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mechtests", "mechanistic claims")
    group.addoption("--model", action="append", default=None, metavar="SPEC",
                    help="model to test claims against (repeatable): a hub name such as gpt2, a "
                         "local Hugging Face directory, or a shipped organism name. Default: each "
                         "claim's own reference subjects.")
    group.addoption("--device", default=None,
                    help="torch device (default: cuda when available, else cpu)")
    group.addoption("--dtype", default="float32",
                    choices=["float32", "float64", "bfloat16", "float16"],
                    help="dtype to load models in (default float32)")
    group.addoption("--seed", type=_seed, default=0,
                    help=f"seed for everything that samples, 0..{SEED_MAX} (default 0)")
    group.addoption("--allow-missing-models", action="store_true", default=False,
                    help="a --model that is not on this machine (a hub name not in the local "
                         "cache, a directory that does not exist) skips its claims instead of "
                         "stopping the run")
    group.addoption("--mutate", action="store_true", default=False,
                    help="mutation-test every claim that holds: re-run it on mutants of its "
                         "subject (heads renumbered, the named components' attention or output "
                         "broken, unnamed components and all weights perturbed) and report a "
                         "kill matrix and a verdict per claim")
    group.addoption("--strict-components", action="store_true", default=False,
                    help="check each claim on the very components its reference names (the "
                         "same head indices), not on whatever plays their role on this "
                         "checkpoint; the role verdict is then shown beside")


def _seed(text: str) -> int:
    try:
        seed = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is out of range: a seed is 0..{SEED_MAX} "
                                         f"(2**64 - 1), as torch.manual_seed takes")
    return seed


def _specs(specs: list[str]) -> list[str]:
    """``core.sequence.unique_specs``, a bad sequence stopping the run with its message."""
    from mechtests.core.sequence import SequenceError, unique_specs

    try:
        return unique_specs(specs)
    except SequenceError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Check ``--model``/``--device`` before any test runs: a typo stops the run, once.

    A spec that names nothing on this machine (a path that does not exist, a hub name not in
    the cache) is an error unless ``--allow-missing-models`` (then its claims skip, saying
    why); a checkpoint that is there but broken is always an error.
    """
    config = session.config
    if hasattr(config, "workerinput"):  # the xdist controller checked already
        return
    problems = []
    try:
        check_device(config.getoption("--device"))
    except DeviceError as exc:
        problems.append(str(exc))
    allow = config.getoption("--allow-missing-models")
    for spec in _specs(config.getoption("--model") or []):
        try:
            check_checkpoint(resolve(spec).path)
        except (ModelUnavailable, NoSuchModel) as exc:
            if not allow:
                problems.append(f"{exc} (given with --model; to run without it, its claims "
                                f"skipped, pass --allow-missing-models)")
        except CheckpointError as exc:
            problems.append(str(exc))
    if problems:
        raise pytest.UsageError("\n".join(problems))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "claim(id, source, subjects=None, kind='mechanism'): a research claim; id names it in "
        "reports, source cites the paper or notebook, subjects lists the reference models it is "
        "written for; kind='behaviour' for a claim about what the model does, naming no "
        "component",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "subject" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("claim")
    own = list(marker.kwargs.get("subjects") or []) if marker else []
    specs = _specs(metafunc.config.getoption("--model") or own)
    if not specs:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid} takes a subject but names no subjects in its claim "
            f"marker and no --model was given"
        )
    metafunc.parametrize(
        "subject",
        [pytest.param(s, id=s, marks=pytest.mark.xdist_group(s)) for s in specs],
        indirect=True,
    )


class ModelSkipped(pytest.skip.Exception):  # type: ignore[name-defined,misc]
    """A skip because a model's weights are not on this machine (reported once per model)."""

    def __init__(self, spec: str, message: str):
        super().__init__(message)
        self.spec, self.message = spec, message


def worker_device(device: str | None, worker: str | None, n_gpus: int) -> str | None:
    """The device a pytest-xdist worker loads its models on: worker ``gw<i>`` takes
    ``cuda:<i mod n_gpus>`` when ``--device`` is left out (or is plain ``cuda``) and the machine
    has GPUs; ``--device cpu`` or ``cuda:N`` is kept as given, and so is everything outside
    xdist. Each worker loads each model once (session cache); ``--dist loadgroup`` keeps a
    model's tests on one worker."""
    if not n_gpus or not worker or device not in (None, "cuda"):
        return device
    if not (worker.startswith("gw") and worker[2:].isdigit()):
        return device
    return f"cuda:{int(worker[2:]) % n_gpus}"


@pytest.fixture(scope="session")
def models(pytestconfig: pytest.Config) -> Callable[[str], Any]:
    """``models(spec)``: the model for ``spec``, loaded once per run with ``--device`` and
    ``--dtype``. A model whose weights are not here is a skip with the loader's message (how
    to get them); a checkpoint that fails to load is an error, shown in full for the first
    test that needs it and in one line for the others (it is tried once, not per test)."""
    import os

    loaded: dict[str, Any] = {}
    first: dict[str, str] = {}  # spec -> the test that reported its load error in full
    dtype = pytestconfig.getoption("--dtype")
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = worker_device(pytestconfig.getoption("--device"),
                           os.environ.get("PYTEST_XDIST_WORKER"), n_gpus)

    def get(spec: str, nodeid: str = ""):
        fresh = spec not in loaded
        if fresh:
            try:
                loaded[spec] = load_model(spec, device, dtype)
            except ModelUnavailable as exc:
                loaded[spec] = exc
            except (CheckpointError, DeviceError) as exc:
                loaded[spec], first[spec] = exc, nodeid
            except Exception as exc:
                loaded[spec], first[spec] = exc, nodeid
                raise  # unexpected: the first test shows the traceback
        if fresh and isinstance(loaded[spec], (CheckpointError, DeviceError)):
            pytest.fail(str(loaded[spec]), pytrace=False)  # the message says it all
        got = loaded[spec]
        if isinstance(got, ModelUnavailable):
            raise ModelSkipped(spec, str(got))
        if isinstance(got, Exception):
            line = (str(got).strip().splitlines() or [type(got).__name__])[0]
            pytest.fail(f"model {spec!r} could not be loaded (in full at {first[spec]}): "
                        f"{type(got).__name__}: {line}", pytrace=False)
        return got

    return get


@pytest.fixture
def subject(request: pytest.FixtureRequest, models: Callable[[str], Any]) -> Subject:
    """The model a claim is checked against (parametrized by ``--model`` or the claim)."""
    model = models(request.param, request.node.nodeid)
    return Subject(request.param, spec_of(model).name, model)


@pytest.fixture(autouse=True)
def _mechtests_seed(request: pytest.FixtureRequest) -> None:
    """Seed torch and random before every test, so the same command gives the same numbers."""
    seed = request.config.getoption("--seed")
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture
def pin(request: pytest.FixtureRequest, heatmap_snapshot: Any):
    """``pin(result, name)``: compare a claim's heatmap with its committed snapshot.

    Only for the claim's own reference subjects (``subjects=[...]`` in its marker): those have
    snapshots in the repository. Any other checkpoint has nothing to compare with; its heatmaps
    go to the report (``record.heatmap``). Call it after the claim's own assertions, so a failing
    claim reports its measurement first.
    """
    from mechtests.suite.snapshot import DEFAULT_ATOL, assert_heatmap

    marker = request.node.get_closest_marker("claim")
    own = set(marker.kwargs.get("subjects") or []) if marker else set()
    callspec = getattr(request.node, "callspec", None)
    spec = callspec.params.get("subject") if callspec else None

    # Snapshots are recorded in float32. A half-precision run is compared at the agreement its
    # dtype allows (README, "Architectures and dtypes"), as a fraction of the heatmap's scale.
    half = HALF_PRECISION_RTOL.get(request.config.getoption("--dtype"))

    def check(result: Any, name: str, atol: float = DEFAULT_ATOL) -> None:
        if spec in own:
            if half is not None:
                scale = float(torch.as_tensor(result.values).float().abs().max())
                atol = max(atol, half * max(1.0, scale))
            assert_heatmap(heatmap_snapshot, result, name=name, atol=atol)

    return check


# -- outcomes: error, inconclusive and model-absent skips kept apart ----------------------------
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """A claim's crash (any exception but its assertion) is an *error*, a bug and not a finding;
    ``Inconclusive`` (the effect-size guard) is its own outcome; a model whose weights are
    absent is one grouped skip with the how-to, not one per test."""
    from mechtests.suite.claims import Inconclusive

    report = yield
    exc = call.excinfo
    if exc is None:
        if call.when == "call" and report.passed and _moved(item):
            report.mechtests_outcome = "moved"  # held, on other components (roles.py)
        return report
    if isinstance(exc.value, ModelSkipped):
        report.longrepr = (f"model {exc.value.spec}", None, exc.value.message)
        report.mechtests_unavailable = exc.value.message
    elif item.get_closest_marker("claim") is None or call.when != "call":
        return report
    elif isinstance(exc.value, Inconclusive) and not hasattr(report, "wasxfail"):
        path, line = item.reportinfo()[:2]
        report.outcome = "skipped"
        report.longrepr = (str(path), (line or 0) + 1, f"Inconclusive: {exc.value}")
        report.mechtests_outcome = "inconclusive"
    elif report.failed and not isinstance(exc.value, (AssertionError,
                                                      pytest.fail.Exception)):
        report.mechtests_outcome = "error"
    return report


def _moved(item: pytest.Item) -> bool:
    """Whether a claim test cast a role onto other components than its reference's."""
    from mechtests.suite.report import PREFIX

    return any(k == PREFIX + "cast" and v.get("moved") for k, v in item.user_properties)


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    marked = getattr(report, "mechtests_outcome", None)
    if report.when == "call" and marked == "inconclusive":
        return "inconclusive", "i", ("INCONCLUSIVE", {"yellow": True})
    if report.when == "call" and marked == "error":
        return "error", "E", ("ERROR", {"red": True})
    if report.when == "call" and marked == "moved":
        return "moved", "m", ("HELD, MOVED", {"blue": True})
    return None


# -- --mutate ------------------------------------------------------------------------------------
_MUTANTS = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """Under ``--mutate``, a claim test that held is re-run on its subject's mutants."""
    from mechtests.suite.report import PREFIX

    subject = getattr(item, "funcargs", {}).get("subject")
    mutating = (item.config.getoption("--mutate") and subject is not None
                and item.get_closest_marker("claim") is not None)
    try:
        result = yield
    except pytest.skip.Exception:
        raise
    except BaseException:
        if mutating:  # mutants say nothing about a claim that does not hold on its subject
            item.user_properties.append((PREFIX + "mutation", {
                "error": f"{item.nodeid}: the claim did not hold on its subject"}))
        raise
    if mutating:
        from mechtests.suite.mutate import MutationError, run_test

        cache = item.config.stash.setdefault(_MUTANTS, {})
        try:
            entry = run_test(item, subject, cache)
        except MutationError as exc:
            entry = {"error": f"{item.nodeid}: {exc}"}
        item.user_properties.append((PREFIX + "mutation", entry))
    return result


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    """A claim on a model the engine cannot run exactly is skipped with the engine's reason
    (what the model has, what is missing), not reported as failed or errored."""
    from mechtests.core.engine import UnsupportedArchitecture

    outcome = yield
    exc = outcome.excinfo[1] if outcome.excinfo else None
    if isinstance(exc, UnsupportedArchitecture) and "subject" in pyfuncitem.fixturenames:
        outcome.force_exception(pytest.skip.Exception(f"unsupported architecture: {exc}",
                                                      _use_item_location=True))
