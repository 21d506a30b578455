#!/usr/bin/env python
"""Fixed costs: what one call and one kernel cost beyond their arithmetic, shave beside ONNX Runtime.

    python benchmarks/overhead.py [--kernels 1,4,16,64] [--threads 0,1,2] [--rounds 7] [--json PATH]

A chain of k 1x1 convs with ReLU on a 16-channel 4x4 map (16 x 16 x 16 multiply-adds each:
arithmetic of a few nanoseconds), so a call's time is almost all fixed cost. shave compiles
each conv to one kernel (`cm.profile` shows k kernel calls) and ONNX Runtime runs k Conv
nodes (Conv + Relu fused). Both engines take numpy in and out, timed the same way, in rounds
that interleave every (engine, k) block with a pause before each; medians. A least-squares
line through (k, ms) gives each engine's cost per call (the intercept: the Python entry,
input copy, output hand-over, the VM's or session's own work) and per kernel (the slope).
For shave the VM call alone (input already in place, output not converted) is timed too,
which splits the per-call cost into Python and VM. `--threads 0` is each engine's default.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_shave_importable, host_line, markdown_table, onnxruntime_engine  # noqa: E402

ensure_shave_importable()


def chain(k: int):
    """k 1x1 convs (16 -> 16 channels) with ReLU, random weights (seed 0)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for _ in range(k):
        layers += [nn.Conv2d(16, 16, 1), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (k, ms)."""
    import numpy as np

    k, ms = np.array(points, dtype=float).T
    slope, intercept = np.polyfit(k, ms, 1)
    return float(intercept), float(slope)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="1,4,16,64", help="chain lengths (kernels per call)")
    ap.add_argument("--threads", default="0,1,2", help="thread counts (0: each engine's default)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200, help="timed calls per block")
    ap.add_argument("--pause", type=float, default=0.5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    import shave

    ks = [int(k) for k in args.kernels.split(",")]
    counts = [int(t) for t in args.threads.split(",")]
    x = torch.randn(1, 16, 4, 4)
    xn = x.numpy()
    engines = {}  # (engine, threads, k) -> callable
    tmp = Path(tempfile.mkdtemp())
    for k in ks:
        model = chain(k)
        cm = shave.compile(model, (x,))
        profiled = len(cm.profile(xn, repeats=1).calls) - 1  # less the VM builtins' row
        print(f"chain of {k}: shave runs {profiled} kernels", flush=True)
        artifact = cm.export(tmp / f"chain{k}.shave")
        for t in counts:
            rt = shave.runtime.load(artifact, threads=t or None)
            state = rt._state(None)
            state.views[0][...] = xn
            engines[("shave", t, k)] = (lambda rt: lambda: rt(xn))(rt)
            engines[("shave VM call", t, k)] = (lambda s: lambda: s.main(*s.bufs))(state)
            ort = onnxruntime_engine(model, x, threads=t)
            engines[("onnxruntime", t, k)] = ort.run
    samples = {key: [] for key in engines}
    for fn in engines.values():
        for _ in range(20):
            fn()
    for _ in range(args.rounds):
        for key, fn in engines.items():
            time.sleep(args.pause)
            for _ in range(args.calls):
                t0 = time.perf_counter()
                fn()
                samples[key].append(time.perf_counter() - t0)
    ms = {key: float(np.median(v)) * 1e3 for key, v in samples.items()}
    rows, out = [], []
    for name in ("shave", "shave VM call", "onnxruntime"):
        for t in counts:
            per_call, per_kernel = fit([(k, ms[(name, t, k)]) for k in ks])
            cells = [name, str(t or "default")] + [f"{ms[(name, t, k)] * 1e3:.1f}" for k in ks]
            rows.append(cells + [f"{per_call * 1e3:.1f}", f"{per_kernel * 1e3:.2f}"])
            out.append({"engine": name, "threads": t or None, "us": {k: ms[(name, t, k)] * 1e3 for k in ks},
                        "per_call_us": per_call * 1e3, "per_kernel_us": per_kernel * 1e3})
    print(f"\n{host_line()}; medians of {args.rounds} rounds x {args.calls} calls\n")
    print(markdown_table(["engine", "threads"] + [f"{k} kernels us" for k in ks] + ["per call us", "per kernel us"],
                         rows, right=set(range(2, 4 + len(ks)))))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"host": host_line(), "rows": out}, indent=1))


if __name__ == "__main__":
    main()
