#!/usr/bin/env python
"""Int8 quantization: accuracy, agreement, latency and file size, shave vs ONNX Runtime's own int8.

    python benchmarks/quantize.py [--perturbed 500] [--rounds 5] [--skip-latency]

1. Fashion-MNIST ResNet (shave.zoo.FashionResNet, trained weights from out/fashion_resnet_e2.pt,
   else 2 epochs of training): test accuracy (10k images) of fp32 and of the int8 graph for each
   calibration method (256 training images), through the integer reference kernels.
2. MobileNetV2 with real ImageNet weights: top-1 agreement of int8 with fp32 on the 20 real images
   and on `--perturbed` copies of them (random crop + resize, flip, brightness, gaussian noise;
   calibration on 64 other perturbed copies).
3. Latency, batch 1, 2 threads, medians of interleaved rounds (under `flock /tmp/shave-cpu.lock`):
   shave fp32, shave int8, ONNX Runtime fp32 and ONNX Runtime int8 (quantize_static, QDQ, per-channel,
   u8 activations x s8 weights, a CalibrationDataReader over the same calibration data); and the
   artifact file sizes (shave) and model file sizes (ONNX).
Results are printed and written to out/quantize.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shave  # noqa: E402
from shave.passes import FoldBN, Quantize  # noqa: E402
from shave.zoo import FashionResNet, imagenet_samples, load_fashion_mnist, pretrained_mobilenet_v2  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "out"


def perturbed_copies(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n perturbed copies of the images x (normalised NCHW): crop 160..224 px + resize, flip,
    brightness x0.8..1.2, gaussian noise (std 0.1 in normalised units)."""
    g = torch.Generator().manual_seed(seed)
    size = x.shape[-1]
    out = []
    for k in range(n):
        img = x[k % len(x)]
        s = int(torch.randint(int(size * 0.7), size + 1, (1,), generator=g))
        i, j = (int(torch.randint(0, size - s + 1, (1,), generator=g)) for _ in range(2))
        img = F.interpolate(img[None, :, i:i + s, j:j + s], size=size, mode="bilinear", align_corners=False)[0]
        if float(torch.rand(1, generator=g)) < 0.5:
            img = img.flip(-1)
        img = img * (0.8 + 0.4 * float(torch.rand(1, generator=g))) + torch.randn(img.shape, generator=g) * 0.1
        out.append(img)
    return torch.stack(out)


def predict(graph, x, batch=50) -> torch.Tensor:
    m = shave.to_torch(graph)
    with torch.no_grad():
        return torch.cat([m(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def fashion_model():
    m = FashionResNet().eval()
    path = OUT / "fashion_resnet_e2.pt"
    if path.exists():
        m.load_state_dict(torch.load(path))
        return m, "out/fashion_resnet_e2.pt"
    from prune_fashion import train

    xt, yt = load_fashion_mnist("train")
    return train(m, xt, yt, 2), "trained 2 epochs here"


def ort_sessions(model, x, calib, workdir: Path, threads: int = 2):
    """ONNX Runtime fp32 and int8 (quantize_static) sessions; their file sizes."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from common import export_onnx

    fp32 = workdir / "m.onnx"
    export_onnx(model, x, fp32)
    name = "input"

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: b[i:i + 1].numpy()} for b in calib for i in range(len(b))])

        def get_next(self):
            return next(self.it, None)

    int8 = workdir / "m.int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in
            (("ort fp32", fp32), ("ort int8", int8))}
    return sess, {"ort fp32": fp32.stat().st_size, "ort int8": int8.stat().st_size}


def median_ms(engines: dict, rounds: int, runs: int = 20) -> dict:
    samples = {k: [] for k in engines}
    for fn in engines.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for k, fn in engines.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) * 1e3 for k, v in samples.items()}


def latency_and_size(label, model, graph, gq, x, calib, rounds) -> dict:
    xn = x.numpy()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cms = {"shave fp32": shave.compile(graph, (x,)), "shave int8": shave.compile(gq, (x,))}
        sizes = {k: cm.export(d / f"{k.replace(' ', '_')}.shave").stat().st_size for k, cm in cms.items()}
        sess, ort_sizes = ort_sessions(model, x, calib, d)
        sizes.update(ort_sizes)
        engines = {k: (lambda cm=cm: cm(xn)) for k, cm in cms.items()}
        engines.update({k: (lambda s=s: s.run(None, {"input": xn})) for k, s in sess.items()})
        ms = median_ms(engines, rounds)
        ort_int8_top = [int(np.argmax(sess["ort int8"].run(None, {"input": b[i:i + 1].numpy()})[0]))
                        for b in calib[:1] for i in range(len(b))]
    print(f"\n{label}: latency (ms, batch 1, median) and file size (bytes)")
    for k in ms:
        print(f"  {k:12s} {ms[k]:8.3f} ms   {sizes[k]:>10,d} B")
    return {"ms": ms, "bytes": sizes, "ort_int8_calib_top1": ort_int8_top}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--perturbed", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    result = {}

    # 1. Fashion-MNIST
    model, source = fashion_model()
    x, y = load_fashion_mnist("test")
    xt, _ = load_fashion_mnist("train")
    g = FoldBN()(shave.capture(model, (x[:1],)))
    calib = [xt[i:i + 64] for i in range(0, 256, 64)]
    acc = {"fp32": float((predict(g, x, 1000) == y).float().mean()) * 100}
    graphs = {}
    for method in ("minmax", "percentile", "mse"):
        graphs[method] = Quantize(calib, method=method)(g)
        acc[f"int8 {method}"] = float((predict(graphs[method], x, 1000) == y).float().mean()) * 100
    print(f"Fashion-MNIST ResNet ({source}), test accuracy % on 10k images:")
    for k, v in acc.items():
        print(f"  {k:18s} {v:6.2f}  ({v - acc['fp32']:+.2f} pt)")
    result["fashion"] = {"accuracy": acc, "weights": source}
    if not args.skip_latency:
        result["fashion"].update(latency_and_size("Fashion-MNIST ResNet", model, g, graphs["minmax"], x[:1],
                                                  calib, args.rounds))

    # 2. MobileNetV2
    mv2 = pretrained_mobilenet_v2().eval()
    imgs, labels = imagenet_samples()
    gm = FoldBN()(shave.capture(mv2, (imgs[:1],)))
    cal = list(perturbed_copies(imgs, 64, seed=1).split(16))
    pert = perturbed_copies(imgs, args.perturbed, seed=2)
    ref_real, ref_pert = predict(gm, imgs), predict(gm, pert)
    agree = {}
    configs = {"percentile, 8-bit weights": dict(method="percentile", reduce_range=False),
               "percentile, 7-bit weights": dict(method="percentile")}
    for name, kw in configs.items():
        t0 = time.perf_counter()
        q = Quantize(cal, **kw)
        gq = q(gm)
        real, pt = predict(gq, imgs), predict(gq, pert)
        agree[name] = {"real20": float((real == ref_real).float().mean()) * 100,
                       "perturbed": float((pt == ref_pert).float().mean()) * 100,
                       "int8_layers": sum(lq.quantized for lq in q.layers), "layers": len(q.layers),
                       "seconds": time.perf_counter() - t0}
        print(f"MobileNetV2 {name}: top-1 agreement with fp32 {agree[name]['real20']:.1f} % on the 20 real images, "
              f"{agree[name]['perturbed']:.1f} % on {len(pert)} perturbed copies", flush=True)
    result["mobilenet_v2"] = {"agreement": agree, "fp32_top1_vs_labels":
                              float((ref_real == torch.tensor(labels)).float().mean()) * 100}
    if not args.skip_latency:
        gq = Quantize(cal, method="percentile", reduce_range=False)(gm)
        result["mobilenet_v2"].update(latency_and_size("MobileNetV2", mv2, gm, gq, imgs[:1], cal, args.rounds))
    OUT.mkdir(exist_ok=True)
    (OUT / "quantize.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
