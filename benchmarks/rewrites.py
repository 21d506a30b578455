#!/usr/bin/env python
"""Shift, group and depthwise-separable rewrites: accuracy, size, FLOPs and measured shave latency.

    python benchmarks/rewrites.py [--finetune-steps 30]

FashionResNet (shave.zoo, trained as in prune_fashion.py, cached in out/) on
real Fashion-MNIST. For each rewrite: the pass on the captured graph, with
least-squares refit on 512 training images, each layer kept only where its
block, compiled and timed alone, beats the conv (target="x86"), then fold_bn, then
shave.compile (x86, default schedules). Test accuracy on the 10k test
images before and after a short distillation fine-tune (shave.finetune,
the original graph as teacher); latency at batch 1 on 2 threads, medians
of interleaved runs, every variant timed in the same rounds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_shave_importable, machine_info, markdown_table, set_thread_env  # noqa: E402

set_thread_env(2)
ensure_shave_importable()

import torch  # noqa: E402

import shave  # noqa: E402
from prune_fashion import batches, fashion_setup, time_variants  # noqa: E402
from shave.passes import DepthwiseSeparable, FoldBN, GroupRewrite, ShiftRewrite  # noqa: E402

VARIANTS = [  # (label, pass factory taking the calibration data); every layer's block
    # is timed against its conv on this machine and kept only where faster (target=)
    ("ShiftRewrite", lambda d: ShiftRewrite(exclude="stem.*", data=d, target="x86")),
    ("ShiftRewrite replicate=2", lambda d: ShiftRewrite(replicate=2, exclude="stem.*", data=d, target="x86")),
    ("GroupRewrite groups=2", lambda d: GroupRewrite(groups=2, data=d, target="x86")),
    ("GroupRewrite groups=4", lambda d: GroupRewrite(groups=4, data=d, target="x86")),
    ("DepthwiseSeparable", lambda d: DepthwiseSeparable(exclude="stem.*", data=d, target="x86")),
    ("DepthwiseSeparable multiplier=2", lambda d: DepthwiseSeparable(multiplier=2, exclude="stem.*", data=d, target="x86")),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetune-steps", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    info = machine_info(2)
    print(f"{info['cpu']}, {info['cores']} cores, {info['isa']}; {time.strftime('%Y-%m-%d')}\n")
    f = fashion_setup()
    model, x, graph, base, evaluate, calib = f.model, f.x1, f.graph, f.base, f.evaluate, f.calib
    ft_data = batches(f.xtr, f.ytr, 128, seed=100)
    compiled = {"original": shave.compile(base, (x,), passes=[])}
    st = base.stats()
    rows = [["original", "-", f"{st['params']:,}", f"{st['flops'] / 1e6:.1f}", "-", f"{evaluate(base):.2f}", "-"]]
    for label, make in VARIANTS:
        t0 = time.perf_counter()
        r = make(calib).apply(graph)
        g = FoldBN()(r.graph)
        kept = [e for e in r.plan if e.kept]
        err = sum(e.refit_error for e in kept) / max(len(kept), 1)
        score = evaluate(g)
        tuned = shave.finetune(g, ft_data, steps=args.finetune_steps, teacher=base)
        compiled[label] = shave.compile(tuned, (x,), passes=[])
        st = g.stats()
        rows.append([label, str(len(kept)), f"{st['params']:,}", f"{st['flops'] / 1e6:.1f}", f"{err:.3f}", f"{score:.2f}",
                     f"{evaluate(tuned):.2f}"])
        print(f"  {label}: {len(kept)} layers rewritten, {score:.2f} % ({time.perf_counter() - t0:.0f} s)", flush=True)
        print("    " + r.summary().replace("\n", "\n    "), flush=True)
    eager, others, quiet = time_variants(compiled, rows, model, x)
    print(f"\nFashionResNet on Fashion-MNIST (test accuracy %, 10k images); PyTorch eager {eager:.3f} ms; other "
          f"processes {others or 0:.1f} % of the CPUs while timing (before: {quiet or 0:.1f} %)\n")
    headers = ["rewrite", "layers", "params", "MFLOPs", "layer error", "accuracy", f"after {args.finetune_steps}-step fine-tune",
               "shave ms", "speed-up"]
    print(markdown_table(headers, rows, right=set(range(1, 9))))
    print("\nlayer error: mean over rewritten layers of ||y_block - y|| / ||y|| on the calibration data, after refit")


if __name__ == "__main__":
    main()
