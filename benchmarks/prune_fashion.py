#!/usr/bin/env python
"""Filter pruning on real Fashion-MNIST: accuracy, size, FLOPs and measured latency.

    python benchmarks/prune_fashion.py [--epochs 2] [--finetune-steps 150] [--ratios 0.3,0.5,0.7]

Trains a small ResNet (shave.zoo.FashionResNet) on the 60k training images
(Debian package dataset-fashion-mnist), then for each criterion and ratio:
prunes the captured graph with shave.passes.Prune, folds batch norm, measures
test accuracy (10k images) before and after a short distillation fine-tune
(shave.finetune with the unpruned graph as teacher), and the compiled model's
latency (batch 1, 2 threads, median) against the unpruned compiled model and
PyTorch eager on the same machine, in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shave  # noqa: E402
from shave.reference import to_torch  # noqa: E402
from shave.passes import FoldBN, Prune  # noqa: E402
from shave.zoo import FashionResNet, load_fashion_mnist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_line  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "out"


def batches(x, y, size, seed):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x) - size + 1, size)]


def train(model, x, y, epochs, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (len(x) // 128))
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(x, y, 128, seed + epoch):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def trained_model(epochs: int = 2, retrain: bool = False):
    """FashionResNet trained `epochs` epochs on Fashion-MNIST, cached in out/ (trained and
    saved when the cache is missing or `retrain`); -> (the model in eval mode, how it was got)."""
    model = FashionResNet()
    cache = OUT / f"fashion_resnet_e{epochs}.pt"
    if cache.is_file() and not retrain:
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval(), f"loaded from out/{cache.name}"
    t0 = time.perf_counter()
    xtr, ytr = load_fashion_mnist("train")
    train(model, xtr, ytr, epochs)
    OUT.mkdir(exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval(), f"trained {epochs} epochs in {time.perf_counter() - t0:.0f} s"


def accuracy(module, x, y) -> float:
    module.eval()
    with torch.no_grad():
        pred = torch.cat([module(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean()) * 100


def median_ms(engines: dict, x, rounds: int = 10, runs: int = 30) -> dict:
    """Median latency (ms) of each callable on x. Engines are timed in turns,
    `runs` calls each per round, so a passing disturbance hits all of them alike."""
    samples = {name: [] for name in engines}
    for fn in engines.values():
        for _ in range(5):
            fn(x)
    for _ in range(rounds):
        for name, fn in engines.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                fn(x)
                samples[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) * 1e3 for name, t in samples.items()}


def time_variants(compiled: dict, rows: list, model, x) -> tuple[float, float | None, float | None]:
    """Times every compiled variant (`compiled`'s first entry is the reference) in
    interleaved rounds once the machine is quiet, appends "ms" and "speed-up" to the
    matching row of `rows`, and returns (PyTorch eager ms, others' CPU % while timing,
    others' CPU % before)."""
    from common import CpuWatch, wait_for_quiet

    quiet = wait_for_quiet(60)
    with CpuWatch() as watch:
        ms = median_ms(compiled, x.numpy(), rounds=5, runs=20)
    with torch.inference_mode(), CpuWatch():
        eager = median_ms({"eager": model}, x, rounds=5, runs=20)["eager"]
    ref = next(iter(compiled))
    for row, key in zip(rows, compiled):
        row += [f"{ms[key]:.3f}", f"{ms[ref] / ms[key]:.2f}x"]
    return eager, watch.others_pct, quiet


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--criteria", default="l1,bn_gamma,reconstruction")
    ap.add_argument("--retrain", action="store_true", help="ignore the cached trained weights in out/")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(host_line())

    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    model, how = trained_model(args.epochs, args.retrain)
    x1 = xte[:1]
    graph = shave.capture(model, (x1,))
    base = FoldBN()(graph)
    compiled = {"-": shave.compile(base, (x1,), passes=[])}
    base_acc = accuracy(model, xte, yte)
    print(f"FashionResNet ({how}); test accuracy {base_acc:.2f} %\n")

    calib = [xtr[i:i + 64] for i in range(0, 512, 64)]
    ft_data = batches(xtr, ytr, 128, seed=100)
    stats0 = base.stats()
    rows = [("-", 0.0, stats0["params"], stats0["flops"], base_acc, base_acc)]
    for criterion in args.criteria.split(","):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            p = Prune(ratio=ratio, criterion=criterion,
                      data=calib if criterion in ("taylor", "reconstruction") else None)
            pruned = FoldBN()(p(graph))
            acc = accuracy(to_torch(pruned, trainable=False), xte, yte)
            tuned = shave.finetune(pruned, ft_data, steps=args.finetune_steps, teacher=base)
            acc_ft = accuracy(to_torch(tuned, trainable=False), xte, yte)
            compiled[(criterion, ratio)] = shave.compile(tuned, (x1,), passes=[])
            st = tuned.stats()
            rows.append((criterion, ratio, st["params"], st["flops"], acc, acc_ft))
            print(f"  {criterion:14} {ratio:.0%}: acc {acc:.2f} -> {acc_ft:.2f} after fine-tune", flush=True)

    with torch.inference_mode():
        eager_ms = median_ms({"eager": model}, x1)["eager"]
    ms = median_ms(compiled, x1.numpy())
    base_ms = ms["-"]
    print(f"\nlatency, batch 1, 2 threads, median: PyTorch eager {eager_ms:.2f} ms, shave unpruned {base_ms:.2f} ms")

    print("\n| criterion | pruned | params | MFLOPs | acc % | acc % after fine-tune | shave ms | vs unpruned shave |"
          " vs eager |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, r, n, f, a, aft in rows:
        t = ms["-" if c == "-" else (c, r)]
        print(f"| {c} | {r:.0%} | {n:,} | {f / 1e6:.1f} | {a:.2f} | {aft:.2f} | {t:.3f} | "
              f"{base_ms / t:.2f}x | {eager_ms / t:.2f}x |")
    print(f"\nfine-tune: {args.finetune_steps} steps of batch 128, Adam 1e-3, distilled from the unpruned model;"
          " 'vs' columns are speed-ups (>1 is faster)")


if __name__ == "__main__":
    main()
