#!/usr/bin/env python
"""Filter pruning on real Fashion-MNIST: accuracy, size, FLOPs and measured latency.

    python benchmarks/prune_fashion.py [--epochs 2] [--recovery-epochs 3] [--ratios 0.3,0.5,0.7]

Trains a small ResNet (shave.zoo.FashionResNet) on the 60k training images
(Debian package dataset-fashion-mnist), then for each criterion and ratio:
prunes the captured graph with shave.passes.Prune (batch norms kept), measures
test accuracy (10k images) before and after recovery (shave.finetune: epochs
over 55k training images, distilled from the unpruned graph, batch norms
trained, the best weights on the 5k held-out training images kept), folds
batch norm, and times the compiled model (batch 1, 2 threads, median) against
the unpruned compiled model and PyTorch eager on the same machine, in the same
run. The last row prunes the highest ratio iteratively (Prune(steps=3), one
recovery epoch after each step: the same recovery budget).
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


def fashion_setup():
    """The trained Fashion ResNet, its captured graph (batch norms kept) and folded graph, and the
    data every Fashion-MNIST benchmark uses: test set, 512 calibration images, 55k training
    images in batches of 128 and the 5k held-out training images; `evaluate(graph)` is test %."""
    from types import SimpleNamespace

    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    model, how = trained_model(2)
    graph = shave.capture(model, (xte[:1],))
    return SimpleNamespace(
        model=model, how=how, x1=xte[:1], graph=graph, base=FoldBN()(graph), xtr=xtr, ytr=ytr, xte=xte, yte=yte,
        calib=[xtr[i:i + 64] for i in range(0, 512, 64)], train=batches(xtr[:55000], ytr[:55000], 128, seed=100),
        held_out=list(zip(xtr[55000:].split(1000), ytr[55000:].split(1000))),
        evaluate=lambda g: accuracy(to_torch(g, trainable=False), xte, yte))


def accuracy(module, x, y) -> float:
    module.eval()
    with torch.no_grad():
        pred = torch.cat([module(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean()) * 100


def median_ms(engines: dict, x, rounds: int = 10, runs: int = 30, pause: float = 0.5) -> dict:
    """Median latency (ms) of each callable on x. Engines are timed in turns,
    `runs` calls each per round, so a passing disturbance hits all of them alike; a `pause`
    (seconds) before each block lets the previous engine's spinning worker threads (ONNX
    Runtime's, PyTorch's OpenMP) go idle, so no engine runs against the one before it."""
    samples = {name: [] for name in engines}
    for fn in engines.values():
        for _ in range(5):
            fn(x)
    for _ in range(rounds):
        for name, fn in engines.items():
            time.sleep(pause)
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
    ap.add_argument("--recovery-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3, help="recovery peak learning rate (AdamW)")
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
    ft_data = batches(xtr[:55000], ytr[:55000], 128, seed=100)
    held_out = list(zip(xtr[55000:].split(1000), ytr[55000:].split(1000)))
    stats0 = base.stats()
    rows = [("-", 0.0, stats0["params"], stats0["flops"], base_acc, base_acc, 0.0)]

    def recover(g, epochs):
        return shave.finetune(g, ft_data, epochs=epochs, lr=args.lr, teacher=graph, validation=held_out)

    ratios = [float(r) for r in args.ratios.split(",")]
    runs = [(c, r, 1) for c in args.criteria.split(",") for r in ratios]
    runs.append((args.criteria.split(",")[0], max(ratios), 3))
    for criterion, ratio, steps in runs:
        p = Prune(ratio=ratio, criterion=criterion, data=calib if criterion in ("taylor", "reconstruction") else None,
                  steps=steps, recover=(lambda g: recover(g, args.recovery_epochs / steps)) if steps > 1 else None)
        t0 = time.perf_counter()
        pruned = p(graph)
        acc = accuracy(to_torch(pruned, trainable=False), xte, yte) if steps == 1 else float("nan")
        tuned = FoldBN()(recover(pruned, args.recovery_epochs) if steps == 1 else pruned)
        seconds = time.perf_counter() - t0
        acc_ft = accuracy(to_torch(tuned, trainable=False), xte, yte)
        label = criterion if steps == 1 else f"{criterion}, {steps} steps"
        compiled[(label, ratio)] = shave.compile(tuned, (x1,), passes=[])
        st = tuned.stats()
        rows.append((label, ratio, st["params"], st["flops"], acc, acc_ft, seconds))
        print(f"  {label:14} {ratio:.0%}: acc {acc:.2f} -> {acc_ft:.2f} after {seconds:.0f} s of recovery", flush=True)

    with torch.inference_mode():
        eager_ms = median_ms({"eager": model}, x1)["eager"]
    ms = median_ms(compiled, x1.numpy())
    base_ms = ms["-"]
    print(f"\nlatency, batch 1, 2 threads, median: PyTorch eager {eager_ms:.2f} ms, shave unpruned {base_ms:.2f} ms")

    print("\n| criterion | pruned | params | MFLOPs | acc % | acc % after recovery | recovery s | shave ms |"
          " vs unpruned shave | vs eager |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, r, n, f, a, aft, sec in rows:
        t = ms["-" if c == "-" else (c, r)]
        print(f"| {c} | {r:.0%} | {n:,} | {f / 1e6:.1f} | {'-' if a != a else f'{a:.2f}'} | {aft:.2f} | {sec:.0f} | "
              f"{t:.3f} | {base_ms / t:.2f}x | {eager_ms / t:.2f}x |")
    print(f"\nrecovery: {args.recovery_epochs} epochs of 55k images (batch 128), AdamW peak lr {args.lr} with warm-up"
          " and cosine decay, distilled from the unpruned model, batch norms trained and folded after, best weights"
          " on 5k held-out training images kept; 'vs' columns are speed-ups (>1 is faster)")


if __name__ == "__main__":
    main()
