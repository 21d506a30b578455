#!/usr/bin/env python
"""Inference latency: PyTorch eager, torch.compile, ONNX Runtime and shave, side by side, on CPU.

    python benchmarks/latency.py                         # MobileNetV2 + ResNet-18, batch 1, each engine's default threads
    python benchmarks/latency.py --models resnet18 --batch 8 --json out/latency.json
    python benchmarks/latency.py --tune-trials 200      # adds "shave tuned" (MetaSchedule, out/tuning)

For each model and engine: warm-up, then the median (and p10/p90, IQR) of
single timed calls, taken in --rounds rounds that interleave the engines (so a
slow spell of the machine falls on all of them), the time relative to eager and
to ONNX Runtime (the median of the per-round ratios), the
GFLOP/s achieved against the machine's fp32 peak, and the largest output
difference from eager. See benchmarks/README.md for how to read the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

QUIET_PCT = 5.0  # others' CPU share (%) above which a timing counts as disturbed


def _target_arg(text: str):
    """--target: a target name as is, or a JSON object -> a TVM target dict."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not a JSON target dict: {e}") from None
    if not isinstance(spec, dict):
        raise argparse.ArgumentTypeError("a JSON target must be an object")
    return spec


def parse_args(argv=None) -> argparse.Namespace:
    from common import DEFAULT_ENGINES, DEFAULT_MODELS, ENGINES, MODELS  # no torch/tvm import happens here

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma-separated, from: {', '.join(ENGINES)}")
    p.add_argument("--tune-trials", type=int, default=None, metavar="N",
                   help="also time shave tuned: tile search plus N MetaSchedule trials per model (adds engine "
                        "shave-tuned; 0 = tile search only); the database is reused, so a second run does not "
                        "tune again")
    p.add_argument("--tune-db", default="out/tuning", help="tuning database directory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every engine (torch intra-op, ORT intra-op, TVM_NUM_THREADS); default: "
                        "each engine's own default, as a user gets it (shave: every CPU the process may use)")
    p.add_argument("--repeats", type=int, default=100, help="timed runs per engine, at most")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per engine before timing, at most")
    p.add_argument("--budget", type=float, default=25.0,
                   help="seconds of timed runs per engine; slow engines get fewer than --repeats runs")
    p.add_argument("--rounds", type=int, default=10,
                   help="time the engines in this many rounds, each engine a block of repeats/rounds runs per "
                        "round (the order rotating, a pause between blocks), so a slow spell of the machine "
                        "hits every engine; ratios are medians of the per-round ratios")
    p.add_argument("--pause", type=float, default=PAUSE_S, metavar="SECONDS",
                   help="sleep before each timed block, so the previous engine's spinning worker threads "
                        "(PyTorch's OpenMP, ONNX Runtime's and TVM's pools) go idle")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before timing each engine, wait up to this long for other processes to leave the "
                        "CPUs (under 5%% busy over 2 s), and time an engine again (twice at most) if "
                        "they came back while it was timed; 0 disables")
    p.add_argument("--target", default="x86", type=_target_arg,
                   help="shave.compile target: a name, or a TVM target dict as JSON (e.g. "
                        "'{\"kind\": \"llvm\", \"mcpu\": \"znver3\"}' for AVX2 code on an AVX-512 host)")
    p.add_argument("--json", metavar="PATH", help="also write the full results (all samples) as JSON")
    p.add_argument("--show-report", action="store_true", help="print shave's per-stage compile report")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.tune_trials is not None and "shave-tuned" not in args.engines:
        args.engines.append("shave-tuned")
    for kind, names, known in (("model", args.models, MODELS), ("engine", args.engines, ENGINES)):
        bad = [n for n in names if n not in known]
        if bad:
            p.error(f"unknown {kind}(s): {', '.join(bad)}; known: {', '.join(known)}")
    return args


PAUSE_S = 0.5  # between timed blocks: lets the previous engine's spinning worker threads go idle


def time_engine(engine, args, common, max_tries: int = 3):
    """measure() under a CpuWatch. With --wait-quiet, wait for quiet first, and if other
    processes still took the CPUs during timing, try again (up to `max_tries`), keeping
    the least disturbed attempt."""
    best = None
    tries = max_tries if args.wait_quiet > 0 else 1
    for attempt in range(tries):
        if args.wait_quiet > 0:
            common.wait_for_quiet(args.wait_quiet)
        with common.CpuWatch() as watch:
            timing, out = common.measure(engine.run, warmup=args.warmup,
                                         repeats=max(1, -(-args.repeats // args.rounds)),
                                         budget_s=args.budget / args.rounds, min_repeats=max(1, 3 // args.rounds))
        if best is None or (watch.others_pct or 0) < (best[2].others_pct or 0):
            best = (timing, out, watch)
        if watch.others_pct is None or watch.others_pct < QUIET_PCT:
            break
        print(f"  {engine.name:<14} other processes took {watch.others_pct:.0f}% of the CPUs while timed"
              + ("; timing again" if attempt + 1 < tries else ""), flush=True)
    return best


def bench_model(name: str, args, common) -> dict:
    """Every selected engine on one model. Failures are recorded, not raised."""
    import torch

    model, desc = common.MODELS[name]()
    x = common.model_input(name, args.batch)
    print(f"\n## {name}: {desc}, input {list(x.shape)}", flush=True)
    factory_kw = {"shave": {"target": args.target},
                  "shave-tuned": {"target": args.target, "trials": 64 if args.tune_trials is None else args.tune_trials, "database": args.tune_db}}

    results, ref, flops = [], None, None
    engines = {}  # result dict id -> engine, for those built
    for ename in args.engines:
        r = {"model": name, "engine": ename, "ok": False}
        try:
            engine = common.ENGINES[ename](model, x, args.threads, **factory_kw.get(ename, {}))
            r.update(engine=engine.name, setup_s=engine.setup_s, info=engine.info, blocks=[], watches=[])
            engines[id(r)] = engine
            flops = flops or engine.info.get("flops")
            print(f"  {engine.name:<14} ready" + (f" (setup {engine.setup_s:.1f} s)" if engine.setup_s is not None
                                                   else ""), flush=True)
        except Exception as e:  # keep going: one broken engine should not hide the others
            r["error"] = _error(e)
            print(f"  {ename:<14} FAILED  {r['error']}", flush=True)
        results.append(r)

    timed = [r for r in results if id(r) in engines]
    for rnd in range(args.rounds):  # every engine once per round, the order rotating
        for r in timed[rnd % len(timed):] + timed[:rnd % len(timed)] if timed else []:
            if "error" in r:
                continue
            time.sleep(args.pause)
            try:
                timing, out, watch = time_engine(engines[id(r)], args, common)
            except Exception as e:
                r["error"] = _error(e)
                print(f"  {r['engine']:<14} FAILED  {r['error']}", flush=True)
                continue
            r["blocks"].append(timing)
            r["watches"].append(watch)
            r["out"] = out
    for r in timed:
        if "error" in r:
            continue
        blocks, watches = r.pop("blocks"), r.pop("watches")
        timing = common.Timing([t for b in blocks for t in b.samples_ms], sum(b.warmup_runs for b in blocks))
        busy = [w.others_pct for w in watches if w.others_pct is not None]
        cores = [w.self_cores for w in watches if w.self_cores is not None]
        r.update(ok=True, timing=timing, round_medians=[b.median for b in blocks],
                 others_cpu_pct=max(busy) if busy else None, cores_busy=float(np.median(cores)) if cores else None)
        print(f"  {r['engine']:<14} median {common.fmt_ms(timing.median):>8} ms over {timing.runs:>3} runs "
              f"in {len(blocks)} round(s)", flush=True)
        if r["engine"] == "pytorch eager":
            ref = r["out"]
    engines.clear()

    if ref is None:  # no eager run to compare with: take the reference output separately
        with torch.inference_mode():
            ref = model(x).numpy()
    if flops is None:
        try:
            flops = common.model_flops(model, x)
        except Exception as e:
            print(f"  (FLOP count unavailable: {type(e).__name__}: {e})")
    for r in results:
        out = r.pop("out", None)
        if r["ok"]:
            r["max_abs_diff"], r["max_rel_diff"] = common.output_diff(out, ref)
    return {"model": name, "description": desc, "input_shape": list(x.shape), "flops": flops,
            "output_max_abs": float(abs(ref).max()), "engines": results}


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def paired_ratio(r: dict, ref: dict) -> float:
    """Median over rounds of r's round median / ref's (the same round): both engines timed
    minutes apart at most, so a slow spell of the machine cancels out."""
    a, b = r.get("round_medians") or [], ref.get("round_medians") or []
    if len(a) == len(b) and a:
        return float(np.median([x / y for x, y in zip(a, b)]))
    return r["timing"].median / ref["timing"].median


def render(models: list[dict], machine: dict) -> str:
    from common import fmt_ms, fmt_ratio, markdown_table

    headers = ["model", "engine", "median ms", "p10 ms", "p90 ms", "IQR ms", "runs", "t/eager", "t/ORT",
               "GFLOP/s", "% peak", "max abs diff vs eager", "setup s", "others' CPU %"]
    rows = []
    for m in models:
        by = {r["engine"]: r for r in m["engines"] if r["ok"]}
        eager, ort_ = by.get("pytorch eager"), by.get("onnxruntime")
        for r in m["engines"]:
            if not r["ok"]:
                rows.append([m["model"], r["engine"], "FAILED"] + [""] * (len(headers) - 3))  # why: under the table
                continue
            t = r["timing"]
            ratio = lambda ref: fmt_ratio(paired_ratio(r, ref)) if ref else "-"  # noqa: E731
            gflops = m["flops"] / (t.median / 1e3) / 1e9 if m["flops"] else None
            peak = machine["peak_gflops"]
            diff = "0 (reference)" if r is eager else f"{r['max_abs_diff']:.2e} (rel {r['max_rel_diff']:.1e})"
            rows.append([m["model"], r["engine"], fmt_ms(t.median), fmt_ms(t.p10), fmt_ms(t.p90), fmt_ms(t.iqr),
                         str(t.runs), ratio(eager), ratio(ort_),
                         f"{gflops:.1f}" if gflops else "-",
                         f"{100 * gflops / peak:.1f}" if gflops and peak else "-",
                         diff, "-" if r.get("setup_s") is None else f"{r['setup_s']:.1f}",
                         "-" if r["others_cpu_pct"] is None else f"{r['others_cpu_pct']:.0f}"])
    return markdown_table(headers, rows, right={2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13})


def main(argv=None) -> int:
    t_start = time.perf_counter()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    args = parse_args(argv)

    import common

    common.set_thread_env(args.threads)  # before anything imports tvm
    common.ensure_shave_importable()
    import numpy as np
    import onnxruntime
    import torch
    import tvm

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = common.machine_info(args.threads)
    load_before = common.loadavg()
    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__,
                "numpy": np.__version__}

    print("# Latency: PyTorch eager vs ONNX Runtime vs shave")
    print(f"cpu: {machine['cpu']}, {machine['cores']} cores visible"
          + (f", {machine['cpu_mhz']:.0f} MHz (/proc/cpuinfo)" if machine["cpu_mhz"] else ""))
    print(f"isa: {machine['isa']}")
    if machine["peak_gflops"]:
        print(f"fp32 peak for {machine['cores_used']} core(s): {machine['cores_used']} x "
              f"{machine['flop_per_cycle']} flop/cycle x {machine['cpu_mhz'] / 1e3:.2f} GHz "
              f"= {machine['peak_gflops']:.1f} GFLOP/s")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    import shave.runtime.threads

    threads = (f"{args.threads}" if args.threads else
               f"each engine's default (shave {shave.runtime.threads.pool_size()}, torch {torch.get_num_threads()}, "
               "ONNX Runtime its own)")
    print(f"batch {args.batch}, threads {threads}, "
          f"warm-up <= {args.warmup}, timed runs <= {args.repeats} and ~{args.budget:.0f} s per engine")
    if load_before:
        print(f"load average before: {load_before[0]:.2f} (1 min)")

    models = []
    for name in args.models:
        try:
            models.append(bench_model(name, args, common))
        except Exception as e:  # e.g. the model (or its weights package) is not importable
            print(f"\n## {name}: FAILED  {type(e).__name__}: {e}", flush=True)
            models.append({"model": name, "error": f"{type(e).__name__}: {e}", "flops": None, "engines": [
                {"model": name, "engine": "(model)", "ok": False, "error": f"{type(e).__name__}: {e}"}]})

    print(f"\n## Results (times in ms per inference, {args.rounds} round(s); t/eager, t/ORT: median of the "
          "per-round ratios, > 1 means slower)\n")
    print(render(models, machine))
    print()
    for m in models:
        for r in m["engines"]:
            if not r["ok"]:
                print(f"- {m['model']} / {r['engine']}: FAILED: {r['error']}")
        if "error" in m:
            continue
        flops = f"{m['flops'] / 1e9:.3f} GFLOP per batch" if m["flops"] else "FLOPs unknown"
        print(f"- {m['model']}: {flops} (multiply and add counted separately); "
              f"max |eager output| = {m['output_max_abs']:.3g}")
        busy = [f"{r['engine']} {r['cores_busy']:.1f}" for r in m["engines"] if r.get("cores_busy") is not None]
        if busy:
            print(f"  - cores kept busy while timed (CPU time / wall time): {', '.join(busy)}")
        for r in m["engines"]:
            info = r.get("info", {})
            if "exporter" in info:
                print(f"  - onnxruntime: ONNX export {info['exporter']}, providers {info['providers']}")
            if "tuning" in info:
                print(f"  - shave tuned: {info['tuning']} (setup s = tuning + compile; "
                      f"a rebuild from the database skips the tuning)")
            if "report" in info and args.show_report:
                print("  - shave compile report:\n" + "\n".join("      " + l for l in info["report"].splitlines()))
            if r["ok"] and r["engine"] != "pytorch eager" and r["max_rel_diff"] > 1e-3:
                print(f"  - WARNING: {r['engine']} output differs from eager by {r['max_rel_diff']:.2e} "
                      "of the output scale: its time is not for a correct result")
    wall = time.perf_counter() - t_start
    busy = [r["others_cpu_pct"] for m in models for r in m["engines"] if r.get("others_cpu_pct") is not None]
    if busy and max(busy) > QUIET_PCT:
        print(f"- WARNING: other processes used up to {max(busy):.0f}% of the machine's CPU time while an "
              "engine was being timed (column \"others' CPU %\"): those times are inflated and noisier; "
              "rerun on a quiet machine for numbers to quote")
    print(f"- total wall time: {wall:.0f} s")

    if args.json:
        out = {"config": {k: getattr(args, k) for k in ("models", "engines", "batch", "threads", "repeats",
                                                        "warmup", "budget", "rounds", "wait_quiet", "target",
                                                        "tune_trials", "tune_db")},
               "machine": machine, "versions": versions, "loadavg_before": load_before, "wall_s": wall,
               "models": []}
        for m in models:
            mm = dict(m, engines=[])
            for r in m["engines"]:
                r = dict(r)
                if "timing" in r:
                    r.update(r.pop("timing").to_dict())
                mm["engines"].append(r)
            out["models"].append(mm)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"- results written to {args.json}")
    return 0 if all(r["ok"] for m in models for r in m["engines"]) else 1


if __name__ == "__main__":
    sys.exit(main())
