"""How long the GPT-2 claims take on CPU, per claim file, against the fixed cost every run pays.

Each case runs ``python -m pytest claims/<file> --model DIR`` in a fresh process, as a user
does, on the GPT-2-shaped model with random weights and GPT-2's tokenizer (the claims' code
paths are the same as on GPT-2's weights: same shapes, same prompt families). The peer case,
``load``, is the same process doing nothing but import, load the model and build the engine:
each file's time over ``load`` is what its claims cost. Timings are ratios within one run (the
machine is shared), never asserts.

``make bench`` measures; under ``--benchmark-disable`` (``make test``) only ``load`` and the
cheapest file run, to keep the command path checked (``tests/test_gpt2_shaped.py`` runs every
GPT-2 claim).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy  # the GPT-2 claims timed at GPT-2 scale

ROOT = Path(__file__).resolve().parent.parent
GPT2_CLAIM_FILES = ("test_contraction.py", "test_entropy_neurons.py", "test_gender.py",
                    "test_induction.py", "test_ioi.py", "test_logit_lens.py",
                    "test_resid_patching.py", "test_token_attribution.py")
CHEAP = "test_logit_lens.py"
LOAD = ("from mechtests.core.models import load_model; "
        "from mechtests.core.engine import engine_for; "
        "engine_for(load_model({path!r}, device='cpu'))")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)


@pytest.mark.parametrize("case", ["load", *GPT2_CLAIM_FILES])
def test_bench_gpt2_claims(benchmark, gpt2_small_dir, case):
    if benchmark.disabled and case not in ("load", CHEAP):
        pytest.skip("timing only (make bench); tests/test_gpt2_shaped.py runs every claim")
    benchmark.group = "GPT-2 claims on CPU (GPT-2-shaped random model)"
    if case == "load":
        args = ["-c", LOAD.format(path=str(gpt2_small_dir))]
    else:
        args = ["-m", "pytest", str(ROOT / "claims" / case), "--model", str(gpt2_small_dir),
                "--no-report", "-q", "-p", "no:cacheprovider"]
    res = benchmark.pedantic(lambda: _run(args), rounds=1, iterations=1)
    if case == "load":
        assert res.returncode == 0, res.stderr[-2000:]
    else:  # the claims fail on random weights (exit 1); anything else is a broken run
        assert res.returncode in (0, 1), res.stdout[-2000:] + res.stderr[-2000:]
        assert " error" not in res.stdout.splitlines()[-1], res.stdout[-2000:]
