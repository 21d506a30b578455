#!/usr/bin/env python
"""Dynamic batch: one shave artifact for any batch size against a static build per batch size,
beside ONNX Runtime (one session with a dynamic batch axis) and PyTorch eager.

    python benchmarks/dynamic_batch.py                      # 5 families, batches 1, 8, 32 (about 25 min)
    python benchmarks/dynamic_batch.py --models resnet18 --batches 1,8,13,32 --json out/dyn.json

For each model (torchvision's definition; MobileNetV2 with its ImageNet weights; batch of N(0, 1)
224x224 images): `shave.compile(model, x1, dynamic_batch=True)` once (kernels for batches 1 and 8;
a batch of 32 runs as 4 x 8, one of 13 as 8 + 5 x 1), and `shave.compile(model, xN)` for every
batch size N; both with the default passes, untuned, and each engine's default threads. Each
round times every (batch, engine) pair in turn (a median of calls within about a second); the
table shows the median over rounds, the dynamic artifact's time over the static build's, and
the largest difference between their outputs relative to the output scale.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MODELS, ensure_shave_importable, export_onnx, fmt_ms, fmt_ratio, host_line,  # noqa: E402
                    make_input, markdown_table, measure, output_diff)

DEFAULT = "mobilenet_v2,resnet18,efficientnet_b0,shufflenet_v2,regnet_y_400mf"


def _ort_dynamic(model, x, workdir: Path):
    """An ONNX Runtime session whose input and output have a dynamic batch axis (default threads,
    all graph optimisations)."""
    import onnxruntime as ort

    path = workdir / "model.onnx"
    export_onnx(model, x, path, dynamic_batch=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_model(name: str, batches: list[int], rounds: int, budget_s: float) -> list[dict]:
    import torch

    import shave

    model, desc = MODELS[name]()
    print(f"{name}: {desc}", flush=True)
    inputs = {b: make_input(b, seed=b) for b in batches}
    t0 = time.perf_counter()
    dyn = shave.compile(model, (make_input(1),), dynamic_batch=True)
    print(f"  dynamic compile {time.perf_counter() - t0:.0f} s, kernels for batch "
          f"{', '.join(dyn.manifest['batch_functions'])}", flush=True)
    static = {}
    for b in batches:
        t0 = time.perf_counter()
        static[b] = shave.compile(model, (inputs[b],))
        print(f"  static batch {b} compile {time.perf_counter() - t0:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as d:
        sess = _ort_dynamic(model, make_input(1), Path(d))
    arrays = {b: x.numpy() for b, x in inputs.items()}
    engines = {
        "static": lambda b: static[b](arrays[b]),
        "dynamic": lambda b: dyn(arrays[b]),
        "onnxruntime": lambda b: sess.run(None, {"input": arrays[b]})[0],
        "eager": lambda b: model(inputs[b]),
    }
    times = {(b, e): [] for b in batches for e in engines}
    outs = {}
    with torch.no_grad():
        for r in range(rounds):
            for b in batches:
                for e, fn in engines.items():
                    t, out = measure(lambda: fn(b), warmup=2, repeats=50, budget_s=budget_s)
                    times[b, e].append(t.median)
                    outs[b, e] = out
            print(f"  round {r + 1}/{rounds} done", flush=True)
    rows = []
    for b in batches:
        med = {e: statistics.median(times[b, e]) for e in engines}
        _, diff = output_diff(outs[b, "dynamic"], outs[b, "static"])
        _, vs_eager = output_diff(outs[b, "dynamic"], outs[b, "eager"].numpy())
        rows.append({"model": name, "batch": b, **{f"{e}_ms": m for e, m in med.items()},
                     "dynamic_over_static": med["dynamic"] / med["static"],
                     "dynamic_over_ort": med["dynamic"] / med["onnxruntime"],
                     "chunks": dyn._runtime.chunks(b) if b not in dyn._runtime.batch_functions else [b],
                     "dynamic_vs_static_rel_diff": diff, "dynamic_vs_eager_rel_err": vs_eager,
                     "rounds_ms": {e: times[b, e] for e in engines}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT, help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per engine, batch and round")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ensure_shave_importable()
    batches = [int(b) for b in args.batches.split(",")]
    print(host_line())
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, batches, args.rounds, args.budget)
    table = markdown_table(
        ["model", "batch", "static ms", "dynamic ms", "dynamic / static", "runs as", "ORT (dynamic) ms",
         "eager ms", "dynamic / ORT", "|dyn - static|"],
        [[r["model"], str(r["batch"]), fmt_ms(r["static_ms"]), fmt_ms(r["dynamic_ms"]),
          fmt_ratio(r["dynamic_over_static"]), " + ".join(f"{c}" for c in r["chunks"]) if len(r["chunks"]) <= 4
          else f"{len(r['chunks'])} calls", fmt_ms(r["onnxruntime_ms"]), fmt_ms(r["eager_ms"]),
          fmt_ratio(r["dynamic_over_ort"]), f"{r['dynamic_vs_static_rel_diff']:.1e}"] for r in rows],
        right={1, 2, 3, 4, 6, 7, 8, 9})
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"host": host_line(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
