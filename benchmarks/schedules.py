"""Default CPU schedules: single conv layers and whole models, naive vs scheduled vs PyTorch eager.

    .venv/bin/python benchmarks/schedules.py                 # layers + models
    .venv/bin/python benchmarks/schedules.py --no-naive      # skip the (slow) unscheduled builds
    .venv/bin/python benchmarks/schedules.py --layers-only / --models-only

`naive` is the same Relax module compiled by TVM's default pipeline without
`schedule_module` (what shave built before); `scheduled` is with it. Times are
medians of --repeats calls (at least 10) after warm-up, with --threads threads
for TVM (TVM_NUM_THREADS, set before tvm is imported) and PyTorch.
GFLOP/s counts multiply and add separately.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# name: (cin, cout, k, stride, padding, groups, hw)
LAYERS = {
    "r18 stem 7x7 s2 3->64 @224": (3, 64, 7, 2, 3, 1, 224),
    "r18 3x3 s1 64->64 @56": (64, 64, 3, 1, 1, 1, 56),
    "r18 3x3 s2 64->128 @56": (64, 128, 3, 2, 1, 1, 56),
    "r18 3x3 s1 128->128 @28": (128, 128, 3, 1, 1, 1, 28),
    "r18 3x3 s1 256->256 @14": (256, 256, 3, 1, 1, 1, 14),
    "r18 3x3 s1 512->512 @7": (512, 512, 3, 1, 1, 1, 7),
    "mv2 stem 3x3 s2 3->32 @224": (3, 32, 3, 2, 1, 1, 224),
    "mv2 1x1 96->24 @56": (96, 24, 1, 1, 0, 1, 56),
    "mv2 1x1 144->24 @56": (144, 24, 1, 1, 0, 1, 56),
    "mv2 1x1 32->192 @28": (32, 192, 1, 1, 0, 1, 28),
    "mv2 1x1 960->160 @7": (960, 160, 1, 1, 0, 1, 7),
    "mv2 1x1 320->1280 @7": (320, 1280, 1, 1, 0, 1, 7),
    "mv2 dw3x3 s1 32 @112": (32, 32, 3, 1, 1, 32, 112),
    "mv2 dw3x3 s2 96 @112": (96, 96, 3, 2, 1, 96, 112),
    "mv2 dw3x3 s1 144 @56": (144, 144, 3, 1, 1, 144, 56),
    "mv2 dw3x3 s2 144 @56": (144, 144, 3, 2, 1, 144, 56),
    "mv2 dw3x3 s1 960 @7": (960, 960, 3, 1, 1, 960, 7),
}


def median_time(fn, repeats, warmup=2, budget=20.0):
    import numpy as np

    for _ in range(warmup):
        fn()
    ts = []
    t_end = time.perf_counter() + budget
    while len(ts) < repeats or (len(ts) < 10):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        if len(ts) >= 10 and time.perf_counter() > t_end:
            break
    return float(np.median(ts))


def build_vm(graph, target, scheduled):
    import tvm
    from tvm import relax

    from shave.backends.tvm.lower import to_relax
    from shave.backends.tvm.schedules import schedule_module

    t0 = time.perf_counter()
    mod = to_relax(graph, target if scheduled else None)  # with a target: the conv kernels
    with tvm.target.Target(target):
        if scheduled:
            mod = schedule_module(mod, target)
        ex = tvm.compile(mod, target=tvm.target.Target(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"], time.perf_counter() - t0


def bench_layers(args):
    import numpy as np
    import torch
    import tvm
    from torch import nn

    import shave
    from shave.target import resolve_target

    target = resolve_target(args.target)
    rows = []
    for name, (cin, cout, k, s, p, g, hw) in LAYERS.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, groups=g), nn.ReLU()).eval()
        x = torch.randn(1, cin, hw, hw)
        oh = (hw + 2 * p - k) // s + 1
        flops = 2 * cout * oh * oh * (cin // g) * k * k
        graph = shave.capture(model, (x,))
        xt = tvm.runtime.tensor(x.numpy())
        with torch.no_grad():
            ref = model(x).numpy()
        row = {"layer": name, "flops": flops}
        for kind in (["naive"] if args.naive else []) + ["scheduled"]:
            f, ct = build_vm(graph, target, kind == "scheduled")
            out = f(xt)[0].numpy()
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            row[kind] = median_time(lambda: f(xt), args.repeats, budget=5.0 if kind == "naive" else 20.0)
            row[kind + "_err"] = err
        with torch.inference_mode():
            row["eager"] = median_time(lambda: model(x), args.repeats)
        rows.append(row)
        print(_layer_line(row, args.naive), flush=True)
    return rows


def _layer_line(r, naive):
    gf = lambda t: r["flops"] / t / 1e9  # noqa: E731
    parts = [f"| {r['layer']:28s} | {r['flops'] / 1e6:8.1f} "]
    if naive:
        parts.append(f"| {r['naive'] * 1e3:9.2f} | {gf(r['naive']):6.1f} ")
    parts.append(f"| {r['scheduled'] * 1e3:9.3f} | {gf(r['scheduled']):6.1f} ")
    parts.append(f"| {r['eager'] * 1e3:9.3f} | {gf(r['eager']):6.1f} | {r['scheduled_err']:.1e} |")
    return "".join(parts)


def bench_models(args):
    import numpy as np
    import torch

    import shave
    import shave.backends.tvm.build as build_mod
    from shave.zoo import pretrained_mobilenet_v2, torchvision_models

    real, real_lower = build_mod.schedule_module, build_mod.to_relax
    for name, make in (("mobilenet_v2", pretrained_mobilenet_v2), ("resnet18", torchvision_models().resnet18)):
        torch.manual_seed(0)
        model = make().eval()
        x = torch.randn(1, 3, 224, 224)
        xn = x.numpy()
        with torch.no_grad():
            ref = model(x).numpy()
        line = f"| {name:13s} "
        for kind in (["naive"] if args.naive else []) + ["scheduled"]:
            build_mod.schedule_module = real if kind == "scheduled" else (lambda mod, target: mod)
            build_mod.to_relax = real_lower if kind == "scheduled" else (lambda graph, target: real_lower(graph))
            try:
                t0 = time.perf_counter()
                cm = shave.compile(model, (x,), target=args.target)
                ct = time.perf_counter() - t0
            finally:
                build_mod.schedule_module, build_mod.to_relax = real, real_lower
            err = float(np.abs(cm(xn) - ref).max() / np.abs(ref).max())
            t = median_time(lambda: cm(xn), args.repeats, budget=10.0 if kind == "naive" else 20.0)
            line += f"| {t * 1e3:8.1f} ms (compile {ct:5.1f} s, err {err:.0e}) "
        with torch.inference_mode():
            t = median_time(lambda: model(x), args.repeats)
        line += f"| {t * 1e3:8.1f} ms |"
        print(line, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--target", default="x86")
    ap.add_argument("--no-naive", dest="naive", action="store_false")
    ap.add_argument("--layers-only", action="store_true")
    ap.add_argument("--models-only", action="store_true")
    args = ap.parse_args()
    args.repeats = max(args.repeats, 10)
    common.set_thread_env(args.threads)
    common.ensure_shave_importable()
    import torch

    torch.set_num_threads(args.threads)
    if not args.models_only:
        head = "| layer | MFLOP " + ("| naive ms | GFLOP/s " if args.naive else "")
        print(head + "| scheduled ms | GFLOP/s | eager ms | GFLOP/s | rel err |")
        bench_layers(args)
    if not args.layers_only:
        print("\n| model " + ("| naive " if args.naive else "") + "| scheduled | eager |")
        bench_models(args)


if __name__ == "__main__":
    main()
