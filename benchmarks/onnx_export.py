#!/usr/bin/env python
"""shave.export_onnx: what a model compressed by shave weighs and how fast it runs when deployed on
ONNX Runtime instead of shave's own artifact, beside the original model's ONNX file.

    python benchmarks/onnx_export.py [--rounds 7] [--json out/onnx_export.json]

MobileNetV2 with its ImageNet weights, batch 1, 224x224. Variants (every one exported by
`shave.export_onnx` from the IR after its passes, except the first, torch.onnx's export):
  original       the model as torch.onnx exports it (fp32)
  fold_bn        shave's IR after batch-norm folding (fp32)
  int8           + Quantize (its defaults for this host: per-channel int8 weights, 7-bit dense ones on AVX2;
                 uint8 activations; QDQ form in ONNX)
  pruned+lr+int8 + Prune(ratio=0.3) + Decompose("tucker2", rank=0.5) + Quantize, no recovery
Quantize calibrates on 64 crops of scikit-image's photographs (none of the evaluation images).
Columns: file sizes (ONNX; shave artifact), latency of ONNX Runtime on the file (all graph
optimisations, default threads) and of shave's artifact of the same graph (default threads),
medians of interleaved rounds; top-1 on the 20 labelled ImageNet images and agreement with the
original's top-1 there; and how far ONNX Runtime's output is from shave's IR (relative to the
output scale; ORT fuses QDQ into its own int8 kernels, so int8 rows differ by rounding).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ensure_shave_importable, export_onnx, fmt_ms, host_line, markdown_table, measure,  # noqa: E402
                    output_diff)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per engine and round")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ensure_shave_importable()

    import numpy as np
    import onnxruntime as ort
    import torch

    import shave
    from shave.passes import Decompose, FoldBN, Prune, Quantize
    from shave.zoo import imagenet_samples, photo_crops, pretrained_mobilenet_v2

    print(host_line())
    model = pretrained_mobilenet_v2()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    images, labels = imagenet_samples()
    calib = list(photo_crops(64, seed=1).split(8))
    g0 = shave.capture(model, (x,))
    folded = FoldBN()(g0)
    int8 = Quantize(calib)(folded)
    small = Quantize(calib)(Decompose("tucker2", rank=0.5)(Prune(ratio=0.3)(folded)))
    with torch.no_grad():
        ref_top1 = model(images).argmax(1).numpy()

    work = Path(tempfile.mkdtemp(prefix="shave-onnx-bench-"))
    orig_path = work / "original.onnx"
    export_onnx(model, x, orig_path, dynamic_batch=True)
    variants = {"original": (None, orig_path), "fold_bn": (folded, None), "int8": (int8, None),
                "pruned+lr+int8": (small, None)}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    rows, engines = [], {}
    for name, (graph, path) in variants.items():
        if path is None:
            path = shave.export_onnx(graph, work / f"{name}.onnx")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0].name
        row = {"variant": name, "onnx_mb": Path(path).stat().st_size / 2**20}
        if graph is not None:
            cm = shave.compile(graph, (x,), passes=[])
            row["artifact_mb"] = cm.export(work / f"{name}.shave").stat().st_size / 2**20
            engines[name, "shave"] = lambda cm=cm: cm(x.numpy())
            row["ort_vs_ir"] = output_diff(sess.run(None, {inp: x.numpy()})[0],
                                           shave.reference.run_graph(graph, [x.numpy()])[0])[1]
            # the 20 images one at a time (the graph's batch is 1)
            top1 = np.array([int(np.argmax(sess.run(None, {inp: images[i:i + 1].numpy()})[0])) for i in range(20)])
        else:
            top1 = sess.run(None, {inp: images.numpy()})[0].argmax(1)
        row["top1"] = float((top1 == np.array(labels)).mean() * 100)
        row["agreement"] = float((top1 == ref_top1).mean() * 100)
        engines[name, "onnxruntime"] = lambda s=sess, i=inp: s.run(None, {i: x.numpy()})[0]
        rows.append(row)
        print(f"{name}: ONNX {row['onnx_mb']:.2f} MB", flush=True)
    engines["original", "eager"] = lambda: model(x)

    times = {k: [] for k in engines}
    with torch.no_grad():
        for r in range(args.rounds):
            for k, fn in (list(engines.items()) if r % 2 == 0 else list(engines.items())[::-1]):
                times[k].append(measure(fn, warmup=2, repeats=100, budget_s=args.budget)[0].median)
    med = {k: statistics.median(v) for k, v in times.items()}
    for row in rows:
        row["ort_ms"] = med[row["variant"], "onnxruntime"]
        row["shave_ms"] = med.get((row["variant"], "shave"))
    print(f"\nPyTorch eager on the original: {fmt_ms(med['original', 'eager'])} ms\n")
    print(markdown_table(
        ["variant", "ONNX MB", "ORT ms", "shave artifact MB", "shave ms", "top-1 (20)", "agrees with original",
         "ORT vs IR"],
        [[r["variant"], f"{r['onnx_mb']:.2f}", fmt_ms(r["ort_ms"]),
          f"{r['artifact_mb']:.2f}" if "artifact_mb" in r else "-", fmt_ms(r["shave_ms"]) if r["shave_ms"] else "-",
          f"{r['top1']:.0f} %", f"{r['agreement']:.0f} %", f"{r['ort_vs_ir']:.1e}" if "ort_vs_ir" in r else "-"]
         for r in rows], right={1, 2, 3, 4, 5, 6, 7}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"host": host_line(), "eager_ms": med["original", "eager"],
                                               "rows": rows, "rounds_ms": {f"{a}/{b}": v for (a, b), v in times.items()}},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
