"""Many checkpoints on a Ray cluster: each checkpoint's claims are one Ray task.

    python -m mechtests.suite.cluster --model 'runs/steps/step-*' --out reports/ [--address auto]
        [-- claims/ -k induction ...]

Each task runs ``pytest`` on one checkpoint in a subprocess (``num_gpus=1`` when the cluster has
GPUs, so Ray gives it its own GPU through ``CUDA_VISIBLE_DEVICES``) and returns that run's
``report.json`` as data; one merge step (``mechtests.suite.report.merge_data``) writes the
combined report, exactly as ``python -m mechtests.suite.report merge`` merges separate runs.
The workers need this repository and the checkpoints at the same paths (a shared filesystem:
where training checkpoints live anyway). Ray is the optional extra ``cluster``
(``pip install -e '.[cluster]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def run_checkpoint(spec: str, pytest_args: list[str], cwd: str,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the claims on one checkpoint (in a subprocess); returns ``{spec, report, rc, tail}``,
    ``report`` being the run's report.json data or None when the run wrote none."""
    with tempfile.TemporaryDirectory(prefix="mechtests-task-") as tmp:
        cmd = [sys.executable, "-m", "pytest", *pytest_args, "--model", spec,
               "--report-dir", tmp, "-p", "no:cacheprovider", "-q"]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              env={**os.environ, **(env or {})})
        found = sorted(Path(tmp).glob("run-*/report.json"))
        report = json.loads(found[0].read_text(encoding="utf-8")) if found else None
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"spec": spec, "report": report, "rc": proc.returncode, "tail": tail,
            "host": os.uname().nodename, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


def run(specs: list[str], pytest_args: list[str], out: Path, address: str | None = None,
        num_cpus: int | None = None, cwd: Path | None = None) -> tuple[Path | None, list[dict]]:
    """Expand ``specs`` (sequences by step), run one Ray task per checkpoint, merge the reports
    into a new run directory under ``out``. Returns (that directory or None, the task results).
    """
    import ray

    from mechtests.core.sequence import expand_all
    from mechtests.suite.report import merge_data, write_report

    checkpoints = list(dict.fromkeys(expand_all(specs)))
    if not checkpoints:
        raise ValueError("no checkpoints: pass --model SPEC (a checkpoint, a directory of them "
                         "or a glob)")
    cwd = Path(cwd or os.getcwd()).resolve()
    env = {"PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(run_checkpoint)
        done = ray.get([task.remote(c, pytest_args, str(cwd), env) for c in checkpoints])
    finally:
        if started:
            ray.shutdown()
    reports = [(f"ray task {d['spec']} on {d['host']}", d["report"]) for d in done
               if d["report"] is not None]
    if not reports:
        return None, done
    command = shlex.join(["python", "-m", "mechtests.suite.cluster", *sys.argv[1:]])
    results, settings, ckpts = merge_data(reports, command)
    settings["ray"] = {"tasks": len(done), "gpus_in_cluster": gpus,
                       "without_report": [d["spec"] for d in done if d["report"] is None]}
    return write_report(results, settings, Path(out), ckpts), done


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m mechtests.suite.cluster",
                                description="Each checkpoint's claims as one Ray task; one "
                                            "merged report. Arguments after -- go to pytest "
                                            "(default: claims/).")
    p.add_argument("--model", action="append", required=True, metavar="SPEC",
                   help="a checkpoint, a directory of checkpoints or a glob (repeatable)")
    p.add_argument("--out", type=Path, default=Path("reports"),
                   help="parent directory of the merged run-*/ (default reports/)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address ('auto' for a running cluster); default: start a "
                        "local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster")
    a = p.parse_args(argv)
    from mechtests.core.sequence import SequenceError

    try:
        written, done = run(a.model, rest or ["claims/"], a.out, a.address, a.num_cpus)
    except SequenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for d in done:
        if d["report"] is None:
            print(f"{d['spec']}: no report (pytest exit {d['rc']}):\n{d['tail']}",
                  file=sys.stderr)
    if written is None:
        print("error: no task wrote a report", file=sys.stderr)
        return 1
    data = json.loads((written / "report.json").read_text(encoding="utf-8"))
    for warning in data.get("warnings", []):
        print(f"WARNING: {warning}", file=sys.stderr)
    print(written / "report.html")
    return 0 if all(d["rc"] in (0, 1) for d in done) else 1


if __name__ == "__main__":
    raise SystemExit(main())
