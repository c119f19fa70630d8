"""Peak memory of one call, this engine against TransformerLens, each in a fresh process.

    python benchmarks/peak_memory.py [--model-dir DIR] [--cases T11xN1 T64xN1] [--tasks ...]

How: the child process loads the model, builds its inputs, releases free heap pages
(``malloc_trim``; ``MALLOC_MMAP_THRESHOLD_=65536`` so large tensors are unmapped when freed),
resets the kernel's high-water mark (``/proc/self/clear_refs``), runs the call once and reports
``VmHWM - VmRSS`` before the call: the extra resident memory the call needed at its peak.
Linux only. Model weights (and the engine's copy of them) are loaded before and not counted.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(impl: str, task: str, case: str, model_dir: str) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from cases import CASES, cells, prompts, run_ours, run_tl

    from mechtests.core.engine import Engine
    from mechtests.core.models import load_model

    torch.set_num_threads(1)
    model = load_model(model_dir, device="cpu")
    engine = Engine(model) if impl == "mechtests" else None
    T, N = CASES[case]
    clean, corrupted = prompts(T, N)
    sub = None if task == "attribution" else cells(task, case, True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    if engine is not None:
        run_ours(engine, task, clean, corrupted, sub)
    else:
        run_tl(model, task, clean, corrupted, sub)
    print(json.dumps({"impl": impl, "task": task, "case": case,
                      "peak_mb": round(_status("VmHWM") - before, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--cases", nargs="+", default=["T11xN1", "T64xN1"])
    ap.add_argument("--tasks", nargs="+", default=["resid_pre", "head_out"])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    model_dir = args.model_dir
    if model_dir is None:
        from mechtests.testing import save_gpt2_shaped_checkpoint

        model_dir = str(save_gpt2_shaped_checkpoint(Path(tempfile.mkdtemp()) / "gpt2_small"))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print(f"{'task':12} {'case':8} {'transformer_lens':>18} {'mechtests':>12}  (peak MB)")
    for task in args.tasks:
        for case in args.cases:
            row = {}
            for impl in ("transformer_lens", "mechtests"):
                out = subprocess.run([sys.executable, __file__, "--child", impl, task, case,
                                      model_dir], env=env, capture_output=True, text=True,
                                     check=True)
                row[impl] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
            print(f"{task:12} {case:8} {row['transformer_lens']:>18} {row['mechtests']:>12}")


if __name__ == "__main__":
    main()
