#!/usr/bin/env python
"""Latency on a busy machine: shave and ONNX Runtime, quiet, beside CPU-bound processes, and
between PyTorch calls in the same process.

    python benchmarks/contention.py                      # MobileNetV2, ResNet-18, EfficientNet-B0
    python benchmarks/contention.py --models mobilenet_v2 --calls 30

Each engine runs with its defaults (shave: every CPU the process may use, with its thread
governor; ONNX Runtime: its own intra-op pool), as a user gets them. For each model, three
conditions, each engine timed in turn (the order alternating between rounds):
- quiet: nothing else running;
- busy: `--load` CPU-bound processes (default: one per CPU) started a second before, killed after;
- after torch: every timed call comes right after one PyTorch eager call of the same model in this
  process (torch's intra-op workers still spinning), the common neighbour in users' code.
The table gives medians and each condition's slowdown against quiet.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, ensure_shave_importable, host_line, make_input, markdown_table  # noqa: E402
from common import onnxruntime_engine, shave_engine  # noqa: E402

SPIN = "while True: pass"


def timed(call, x, calls: int, before=None) -> float:
    """Median seconds of `calls` calls (after two untimed ones); `before()` runs untimed before each."""
    for _ in range(2):
        call(x)
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mobilenet_v2,resnet18,efficientnet_b0")
    ap.add_argument("--calls", type=int, default=40, help="timed calls per engine and condition and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--load", type=int, default=None, help="CPU-bound processes in the busy condition "
                    "(default: one per CPU this process may use)")
    args = ap.parse_args(argv)
    ensure_shave_importable()
    import torch

    load = args.load or len(os.sched_getaffinity(0))
    print(host_line())
    print(f"each engine's default threads; busy = {load} CPU-bound processes; {args.calls} calls per measurement, "
          f"median over {args.rounds} rounds\n", flush=True)
    rows = []
    for name in args.models.split(","):
        model, desc = MODELS[name]()
        x = make_input(1)
        xn = x.numpy()
        engines = {"shave": shave_engine(model, x, None).call, "onnxruntime": onnxruntime_engine(model, x, None).call}

        def eager():
            with torch.inference_mode():
                model(x)

        res = {(e, c): [] for e in engines for c in ("quiet", "busy", "after torch")}
        for r in range(args.rounds):
            for cond in ("quiet", "busy", "after torch"):
                spinners = []
                if cond == "busy":
                    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(load)]
                    time.sleep(1.0)
                try:
                    for e in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                        time.sleep(0.5)
                        res[e, cond].append(timed(engines[e], xn, args.calls,
                                                  eager if cond == "after torch" else None))
                finally:
                    for p in spinners:
                        p.kill()
                        p.wait()
        for e in engines:
            q, b, t = (statistics.median(res[e, c]) * 1e3 for c in ("quiet", "busy", "after torch"))
            rows.append([desc.split(",")[0], e, f"{q:.2f}", f"{b:.2f}", f"{b / q:.1f}x", f"{t:.2f}", f"{t / q:.1f}x"])
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(markdown_table(["model", "engine", "quiet ms", "busy ms", "busy / quiet", "after torch ms",
                          "after torch / quiet"], rows, right={2, 3, 4, 5, 6}))


if __name__ == "__main__":
    main()
