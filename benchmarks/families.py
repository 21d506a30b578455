#!/usr/bin/env python
"""Breadth: every torchvision classification family and a LeNet-sized CNN, shave beside PyTorch
eager, torch.compile and ONNX Runtime, at batch 1 and 8.

    python benchmarks/families.py                                # every family, batch 1 and 8 (about an hour)
    python benchmarks/families.py --models resnet18,lenet5 --batches 1 --json out/families.json
    python benchmarks/families.py --tune-trials 0                # adds shave tuned (tile search; slow)
    python benchmarks/families.py --target '{"kind": "llvm", "mcpu": "znver3"}'   # AVX2 code on an AVX-512 host

Each model (torchvision's definition, random weights after torch.manual_seed(0); LeNet-5 on
1x28x28) is timed by latency.py's method: every engine built with the defaults a user gets
(each engine's own default thread count), then timed in --rounds rounds that interleave the
engines with a pause before each block; the ratios are medians of the per-round ratios. The
LeNet-sized CNN is timed again with every engine at 1 and at 2 threads (torch intra-op threads,
ONNX Runtime intra-op threads, the shave runtime's `threads`). "compile s" is shave's untuned
compile (capture, passes, TVM build, the numerical check). A failed engine shows in the table
with its first error line under it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FAMILIES = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "densenet121", "googlenet",
            "inception_v3", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0",
            "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2", "squeezenet1_0",
            "mnasnet1_0", "convnext_tiny", "alexnet", "lenet5"]
SMALL = "lenet5"  # also timed at explicit thread counts
ENGINE_ORDER = ["pytorch eager", "torch.compile", "onnxruntime", "shave", "shave tuned"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(FAMILIES))
    p.add_argument("--batches", default="1,8", help="batch sizes")
    p.add_argument("--engines", default="eager,torch.compile,onnxruntime,shave")
    p.add_argument("--tune-trials", type=int, default=None, metavar="N",
                   help="also time shave tuned (tile search plus N MetaSchedule trials; 0 = tile search only)")
    p.add_argument("--tune-db", default="out/tuning")
    p.add_argument("--small-threads", default="1,2", help="thread counts the LeNet-sized CNN is also timed at")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed runs per engine, over all rounds")
    p.add_argument("--repeats", type=int, default=200, help="timed runs per engine, at most, over all rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--target", default="x86",
                   help="shave's target: a name, or a TVM target dict as JSON (code for another CPU than the "
                        "host's, timed beside the other engines on this host's instruction set)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.small_threads = [int(t) for t in args.small_threads.split(",") if t.strip()]
    return args


def _latency_args(args, batch: int, threads: int | None):
    """The argument namespace latency.bench_model reads."""
    import latency

    engines = args.engines + (",shave-tuned" if args.tune_trials is not None else "")
    return latency.parse_args(["--engines", engines, "--batch", str(batch), "--rounds", str(args.rounds),
                               "--budget", str(args.budget), "--repeats", str(args.repeats),
                               "--warmup", str(args.warmup), "--pause", str(args.pause),
                               "--tune-db", args.tune_db, "--models", "resnet18",
                               "--target", args.target]
                              + (["--tune-trials", str(args.tune_trials)] if args.tune_trials is not None else [])
                              + (["--threads", str(threads)] if threads else []))


def run_one(name: str, batch: int, threads: int | None, args, common) -> dict:
    import latency
    import torch

    default_threads = torch.get_num_threads()
    try:
        m = latency.bench_model(name, _latency_args(args, batch, threads), common)
    except Exception as e:  # the model itself failed to build
        m = {"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
             "engines": []}
    finally:
        torch.set_num_threads(default_threads)  # eager_engine(threads=n) changes it process-wide
    m.update(batch=batch, threads=threads)
    return m


def row(m: dict) -> dict:
    """The table's numbers for one (model, batch, threads) run."""
    import latency

    by = {r["engine"]: r for r in m["engines"]}
    ok = {k: r for k, r in by.items() if r["ok"]}
    out = {"model": m["model"], "batch": m["batch"], "threads": m["threads"], "ms": {}, "errors": {}}
    for k, r in by.items():
        if r["ok"]:
            out["ms"][k] = r["timing"].median
        else:
            out["errors"][k] = r.get("error", "?")
    if "error" in m:
        out["errors"]["(model)"] = m["error"]
    shave = ok.get("shave")
    if shave is not None:
        out["compile_s"] = shave.get("setup_s")
        out["max_rel_diff"] = shave.get("max_rel_diff")
    for num, den, key in (("shave", "onnxruntime", "shave/ORT"), ("shave tuned", "onnxruntime", "tuned/ORT"),
                          ("shave", "pytorch eager", "shave/eager")):
        if num in ok and den in ok:
            out[key] = latency.paired_ratio(ok[num], ok[den])
    return out


def render(rows: list[dict]) -> str:
    from common import fmt_ms, fmt_ratio, markdown_table

    engines = [e for e in ENGINE_ORDER if any(e in r["ms"] or e in r["errors"] for r in rows)]
    ratios = [k for k in ("shave/ORT", "tuned/ORT", "shave/eager") if any(k in r for r in rows)]
    headers = ["model", "batch", "threads"] + [f"{e} ms" for e in engines] + ratios + ["compile s", "rel. error"]
    body = []
    for r in rows:
        cells = [r["model"], str(r["batch"]), str(r["threads"] or "default")]
        cells += [fmt_ms(r["ms"][e]) if e in r["ms"] else ("FAILED" if e in r["errors"] else "-") for e in engines]
        cells += [fmt_ratio(r[k]) if k in r else "-" for k in ratios]
        cells += [f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-",
                  f"{r['max_rel_diff']:.1e}" if r.get("max_rel_diff") is not None else "-"]
        body.append(cells)
    return markdown_table(headers, body, right=set(range(1, len(headers))))


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    import common

    unknown = [m for m in args.models if m not in common.MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(common.MODELS)}")
    common.ensure_shave_importable()
    print("# Families: PyTorch eager, torch.compile, ONNX Runtime and shave")
    print(common.host_line())
    if args.target != "x86":
        print(f"shave built for target {args.target} (the other engines use this host's instruction set)")
    print(f"batches {args.batches}, each engine's default threads ({args.rounds} rounds, ~{args.budget:.0f} s "
          f"per engine); {SMALL} also at {args.small_threads} threads", flush=True)
    runs = [(name, b, None) for name in args.models for b in args.batches]
    runs += [(SMALL, b, t) for b in args.batches for t in args.small_threads if SMALL in args.models]
    results = []
    for name, batch, threads in runs:
        results.append(run_one(name, batch, threads, args, common))
        print(render([row(results[-1])]), flush=True)
    rows = [row(m) for m in results]
    print("\n## Results (ms per call, medians; ratios: medians of per-round ratios, < 1 means shave is faster)\n")
    print(render(rows))
    failures = [(r["model"], r["batch"], r["threads"], e, msg) for r in rows for e, msg in r["errors"].items()]
    for model, batch, threads, engine, msg in failures:
        print(f"- {model} batch {batch} threads {threads or 'default'} / {engine}: FAILED: {msg}")
    slow = [r for r in rows if r.get("compile_s") and r["compile_s"] > 60]
    for r in slow:
        print(f"- {r['model']} batch {r['batch']}: shave compile took {r['compile_s']:.0f} s (> 60 s)")
    wall = time.perf_counter() - t0
    print(f"- total wall time: {wall:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"host": common.host_line(), "config": vars(args), "rows": rows, "wall_s": wall}, f,
                      indent=1, default=str)
        print(f"- results written to {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
