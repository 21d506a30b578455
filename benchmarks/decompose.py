#!/usr/bin/env python
"""Low-rank and separable decomposition: accuracy, size, FLOPs and measured shave latency.

    python benchmarks/decompose.py [--models fashion,mobilenet_v2,resnet18] [--finetune-steps 150]

For each model and each (method, rank rule): shave.passes.Decompose on the
captured graph, then fold_bn, then shave.compile (x86, default schedules),
timed at batch 1 on 2 threads (medians of interleaved runs, all variants of
a model timed in the same rounds). Fashion-MNIST ResNet (shave.zoo, trained
as in prune_fashion.py): test accuracy on the 10k test images, before and
after a short distillation fine-tune (shave.finetune). MobileNetV2 (ImageNet
weights) and ResNet-18 (random init, seed 0; no ImageNet weights ship with
shave): top-1 agreement with the original model on the 20 real ImageNet
images of shave.zoo.imagenet_samples (no fine-tune: there is no ImageNet
training data here). Rows with rank "auto" keep a layer's decomposition only
where the compiled layer was measured faster; under the table, every kept
layer is timed again, independently, against the original layer.
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
from prune_fashion import OUT, accuracy, batches, time_variants, trained_model  # noqa: E402
from shave.reference import to_torch  # noqa: E402
from shave.passes import Decompose, FoldBN  # noqa: E402

# (method, rule, value): rule is "budget" (flop_budget), "energy", "auto" (value: min speed-up), "refit"
FASHION = [(m, "budget", 0.5) for m in ("weight_svd", "spatial", "tucker2", "cp")] + [
    ("tucker2", "refit", 0.5), ("tucker2", "auto", 1.1)]
IMAGENET = {
    "mobilenet_v2": [("weight_svd", "energy", 0.95), ("weight_svd", "auto", 1.1)],
    "resnet18": [("weight_svd", "budget", 0.5), ("tucker2", "budget", 0.5), ("tucker2", "auto", 1.1)],
}


def make_pass(method, rule, value, calib=None):
    if rule == "budget":
        return Decompose(method, flop_budget=value)
    if rule == "energy":
        return Decompose(method, energy=value)
    if rule == "refit":
        return Decompose(method, flop_budget=value, data=calib)
    return Decompose(method, rank="auto", min_speedup=value, cache=OUT / "decompose_latency.json")


def label(method, rule, value) -> str:
    return {"budget": f"{value:.0%} FLOPs", "energy": f"energy {value}", "refit": f"{value:.0%} FLOPs + refit",
            "auto": f"auto (>= {value}x)"}[rule]


def recheck_auto(p: Decompose, plan, graph) -> str:
    """Time every layer that rank='auto' kept (in `plan`) again, from scratch, against the original layer."""
    kept = [e for e in plan if e.kept]
    if not kept:
        return f"{p.method} auto: no layer kept"
    ratios = [(e.name, *p.measure(graph, graph.node(e.name), e.rank, cached=False)) for e in kept]
    worst = max(ratios, key=lambda r: r[2] / r[1])
    return (f"{p.method} auto: {len(kept)}/{len(plan)} layers kept; timed again, every kept layer "
            f"{'is' if worst[2] < worst[1] else 'is NOT'} faster than the original; slowest relative: "
            f"{worst[0]} {worst[1] * 1e3:.3f} -> {worst[2] * 1e3:.3f} ms")


def run_model(name, model, x, evaluate, finetune=None, calib=None, variants=()):
    graph = shave.capture(model, (x,))
    base = FoldBN()(graph)
    compiled = {"original": shave.compile(base, (x,), passes=[])}
    st = base.stats()
    base_score = evaluate(base)
    rows = [["original", "-", f"{st['params']:,}", f"{st['flops'] / 1e6:.1f}", f"{base_score:.2f}", "-"]]
    notes = []
    for method, rule, value in variants:
        t0 = time.perf_counter()
        p = make_pass(method, rule, value, calib)
        result = p.apply(graph)
        g = FoldBN()(result.graph)
        score = evaluate(g)
        tuned = finetune(g, base) if finetune else None
        key = f"{method} {label(method, rule, value)}"
        compiled[key] = shave.compile(tuned or g, (x,), passes=[])
        st = g.stats()
        rows.append([method, label(method, rule, value), f"{st['params']:,}", f"{st['flops'] / 1e6:.1f}",
                     f"{score:.2f}", f"{evaluate(tuned):.2f}" if tuned is not None else "-"])
        print(f"  {name} {key}: {score:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if rule == "auto":
            notes.append(recheck_auto(p, result.plan, graph))
    eager, others, quiet = time_variants(compiled, rows, model, x)
    return rows, notes, eager, others, quiet


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="fashion,mobilenet_v2,resnet18")
    ap.add_argument("--finetune-steps", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    info = machine_info(2)
    print(f"{info['cpu']}, {info['cores']} cores, {info['isa']}; {time.strftime('%Y-%m-%d')}\n")
    headers = ["method", "rank", "params", "MFLOPs", "score", "after fine-tune", "shave ms", "speed-up"]
    for name in args.models.split(","):
        if name == "fashion":
            from shave.zoo import load_fashion_mnist

            xtr, ytr = load_fashion_mnist("train")
            xte, yte = load_fashion_mnist("test")
            model, _ = trained_model(2)
            ft_data = batches(xtr, ytr, 128, seed=100)
            rows, notes, eager, others, quiet = run_model(
                "fashion", model, xte[:1], lambda g: accuracy(to_torch(g, trainable=False), xte, yte),
                finetune=lambda g, teacher: shave.finetune(g, ft_data, steps=args.finetune_steps, teacher=teacher),
                calib=[xtr[i:i + 64] for i in range(0, 512, 64)], variants=FASHION)
            title = "FashionResNet on Fashion-MNIST (score: test accuracy %, 10k images)"
        else:
            from shave.zoo import imagenet_samples, pretrained_mobilenet_v2, torchvision_models

            torch.manual_seed(0)
            model = pretrained_mobilenet_v2() if name == "mobilenet_v2" else torchvision_models().resnet18().eval()
            images, _ = imagenet_samples()
            with torch.no_grad():
                ref = model(images).argmax(1)

            def agreement(g):
                with torch.no_grad():
                    return float((to_torch(g, trainable=False)(images).argmax(1) == ref).float().mean()) * 100

            rows, notes, eager, others, quiet = run_model(name, model, images[:1], agreement,
                                                          variants=IMAGENET[name])
            title = (f"{name} (score: top-1 agreement % with the original on 20 ImageNet images; "
                     f"{'ImageNet weights' if name == 'mobilenet_v2' else 'random init, seed 0'})")
        print(f"\n{title}; PyTorch eager {eager:.3f} ms; other processes {others or 0:.1f} % of the CPUs while "
              f"timing (before: {quiet or 0:.1f} %)\n")
        print(markdown_table(headers, rows, right=set(range(2, 8))))
        for n in notes:
            print(f"- {n}")
        print(flush=True)


if __name__ == "__main__":
    main()
