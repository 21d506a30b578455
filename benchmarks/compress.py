#!/usr/bin/env python
"""shave.compress end to end: the chosen artifact's accuracy and latency beside ONNX Runtime and
PyTorch eager on the original model, in one run.

    python benchmarks/compress.py [--models fashion,mobilenet_v2] [--max-drop 1.0] [--time-budget 900]

1. Fashion-MNIST ResNet (trained weights from out/fashion_resnet_e2.pt): the search scores
   candidates by accuracy on the 5k held-out training images (max drop `--max-drop` points),
   recovers on the 55k others (labels + distillation), calibrates int8 on 512 of them; the table
   gives test accuracy (10k images) of the original and the chosen model.
2. MobileNetV2 (real ImageNet weights, no labels): candidates are scored by top-1 agreement with
   the original on a set built the way the evaluation set is, from scikit-image's photographs
   instead of the evaluation images: 20 crops the original recognises (top-1 probability >= 0.5;
   a crop of sky or wall shows no class, and agreement on it measures noise) and 500 perturbed
   copies of them (bench-quantize's perturbations, another seed); recovered by label-free
   distillation on 1,000 other crops and calibrated on 64 more (none of them the 20 evaluation
   images); the table gives agreement on the 20 ImageNet images and 500 perturbed copies
   (bench-quantize's set).
Latency: batch 1, medians of interleaved rounds, every engine with its default threads (shave:
the cores this process may use; ONNX Runtime: its default session). Writes each run's report
(markdown + Pareto plot) to out/compress/<model>/; the search's decisions are logged to stderr.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import shave  # noqa: E402
from common import CpuWatch, host_line, markdown_table, onnxruntime_engine, wait_for_quiet  # noqa: E402
from prune_fashion import OUT, accuracy, fashion_setup, median_ms  # noqa: E402


def side_by_side(name, model, x, result, score_of, score_label) -> None:
    ort = onnxruntime_engine(model, x, threads=0)
    xn = x.numpy()
    engines = {"PyTorch eager": lambda _: model(x), "ONNX Runtime fp32": lambda _: ort.run(),
               "shave, original": lambda _: result.baseline_compiled(xn), "shave, compressed": lambda _: result.compiled(xn)}
    quiet = wait_for_quiet(60)
    with torch.inference_mode(), CpuWatch() as watch:
        ms = median_ms(engines, x, rounds=7, runs=30)
    scores = {"PyTorch eager": score_of(None), "ONNX Runtime fp32": score_of(None),
              "shave, original": score_of(None), "shave, compressed": score_of(result.graph)}
    rows = [[k, f"{scores[k]:.2f}", f"{v:.3f}", f"{ms['ONNX Runtime fp32'] / v:.2f}x"] for k, v in ms.items()]
    print(f"\n{name}, {host_line()}; others' CPU: {quiet or 0:.0f} % before, {watch.others_pct:.0f} % while timing")
    print(f"search: {len(result.pareto)} candidates, {result.seconds:.0f} s; steps: {', '.join(result.steps) or 'none'}; "
          f"{result.message}\n")
    print(markdown_table(["engine", score_label, "ms", "speed-up vs ONNX Runtime"], rows, right={1, 2, 3}))
    path = result.save_report(OUT / "compress" / name.split()[0].lower())
    print(f"\nreport: {path.relative_to(OUT.parent)}")


def fashion(args) -> None:
    f = fashion_setup()
    held_x = torch.cat([x for x, _ in f.held_out])
    held_y = torch.cat([y for _, y in f.held_out])
    evaluate = lambda m: accuracy(m, held_x, held_y)  # noqa: E731
    result = shave.compress(
        f.model, (f.x1,), evaluate, max_drop=args.max_drop, train=f.train, calibration=f.calib,
        time_budget=args.time_budget, recovery={"steps": 300, "lr": 3e-3},
        final_recovery={"epochs": 2, "lr": 3e-3, "validation": f.held_out})
    test = lambda g: f.evaluate(g if g is not None else f.graph)  # noqa: E731
    side_by_side("Fashion-MNIST ResNet", f.model, f.x1, result, test, "test accuracy %")


def mobilenet(args) -> None:
    from quantize import perturbed_copies

    from shave.zoo import imagenet_samples, photo_crops, pretrained_mobilenet_v2

    def top1(m, x):
        with torch.no_grad():
            return torch.cat([m(x[i:i + 50]).argmax(1) for i in range(0, len(x), 50)])

    def agreement(m, x, ref):
        return float((top1(m, x) == ref).float().mean()) * 100

    model = pretrained_mobilenet_v2().eval()
    imgs, _ = imagenet_samples()
    evalset = torch.cat([imgs, perturbed_copies(imgs, 500, seed=2)])
    ref_eval = top1(model, evalset)
    crops = photo_crops(1000 + 256 + 64, seed=0)
    train, pool, calib = crops[:1000], crops[1000:1256], crops[1256:]
    with torch.no_grad():
        recognised = pool[model(pool).softmax(1).max(1).values >= 0.5][:20]
    search_set = torch.cat([recognised, perturbed_copies(recognised, 500, seed=3)])
    ref_search = top1(model, search_set)
    result = shave.compress(
        model, (imgs[:1],), lambda m: agreement(m, search_set, ref_search), max_drop=args.max_drop_mobilenet,
        train=list(train.split(32)), calibration=list(calib.split(32)), time_budget=args.time_budget,
        recovery={"steps": 30, "lr": 1e-4, "augment": shave.augment()},
        final_recovery={"epochs": 2, "lr": 1e-4, "augment": shave.augment()})
    score = lambda g: 100.0 if g is None else agreement(shave.to_torch(g), evalset, ref_eval)  # noqa: E731
    side_by_side("MobileNetV2 (ImageNet weights, no labels)", model, imgs[:1], result, score,
                 "top-1 agreement % (520 images)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="fashion,mobilenet_v2")
    ap.add_argument("--max-drop", type=float, default=1.0, help="Fashion: accuracy points")
    ap.add_argument("--max-drop-mobilenet", type=float, default=5.0, help="MobileNetV2: agreement points")
    ap.add_argument("--time-budget", type=float, default=720.0, help="seconds of search per model (the final recovery comes after)")
    args = ap.parse_args(argv)
    # the search's decisions (each option, step and int8 check) go to stderr with their time
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("shave").setLevel(logging.INFO)
    torch.manual_seed(0)
    print(host_line(len(os.sched_getaffinity(0))))
    t0 = time.perf_counter()
    if "fashion" in args.models:
        fashion(args)
    if "mobilenet_v2" in args.models:
        mobilenet(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
