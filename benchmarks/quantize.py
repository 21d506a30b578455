#!/usr/bin/env python
"""Int8 quantization: accuracy, agreement, latency and file size, shave vs ONNX Runtime's own int8.

    python benchmarks/quantize.py [--perturbed 500] [--calib 128] [--rounds 5] [--skip-latency] [--sweep] [--quick]

1. Fashion-MNIST ResNet (shave.zoo.FashionResNet, trained weights from out/fashion_resnet_e2.pt,
   else 2 epochs of training): test accuracy (10k images) of fp32 and of the int8 graph for each
   calibration method (256 training images), through the integer reference kernels.
2. MobileNetV2 with real ImageNet weights: top-1 agreement of int8 with fp32 on the 20 real images
   and on `--perturbed` copies of them (random crop + resize, flip, brightness, gaussian noise, seed 2;
   calibration on `--calib` other perturbed copies, seed 1). Each setting is evaluated through its
   fake-quant simulation (torch); the default setting also through the compiled shave int8 artifact
   (batch 1), and ONNX Runtime's int8 model on the same images. `--sweep` evaluates the whole table
   of settings (weight bits, weight clipping, bias correction, first/last layer float, calibration size).
3. Latency, batch 1, 2 threads, medians of interleaved rounds, a 0.5 s pause before each engine's block (under `flock /tmp/shave-cpu.lock`):
   shave fp32, shave int8 (MobileNetV2: the default setting, and "fast": 7-bit dense weights, whose
   kernels use AVX2's u8 x s8 pair sums), ONNX Runtime fp32 and ONNX Runtime int8 (quantize_static, QDQ, per-channel,
   u8 activations x s8 weights, a CalibrationDataReader over the same calibration data); and the
   artifact file sizes (shave) and model file sizes (ONNX).
`--share`: also k-means weight sharing of MobileNetV2 at 8/5/4/3 bits (rates, sizes, errors).
`--quick`: 100 perturbed copies, 32 calibration images, 2 latency rounds, one Fashion-MNIST method.
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
from shave.passes.quantize import convert  # noqa: E402
from prune_fashion import OUT, median_ms, trained_model  # noqa: E402
from common import host_line  # noqa: E402
from shave.zoo import imagenet_samples, load_fashion_mnist, pretrained_mobilenet_v2  # noqa: E402


CALIB = 64  # calibration images (perturbed copies, seed 1) for MobileNetV2
# MobileNetV2 settings: Quantize keywords (and "calib": the number of calibration images)
SWEEP = {
    "7-bit weights, minmax": dict(method="minmax", reduce_range=True, bias_correction=False),
    "7-bit weights, percentile": dict(method="percentile", reduce_range=True, bias_correction=False),
    "8-bit weights, percentile": dict(method="percentile", reduce_range=False, bias_correction=False),
    "8-bit weights, MSE activations": dict(method="mse", reduce_range=False, bias_correction=False),
    "7-bit dense / 8-bit depthwise, percentile": dict(method="percentile", reduce_range="dense",
                                                      bias_correction=False),
    "8-bit, percentile, MSE weight clipping": dict(method="percentile", reduce_range=False, weight_method="mse",
                                                   bias_correction=False),
    "8-bit, percentile, first/last layer float": dict(method="percentile", reduce_range=False,
                                                      keep_ends_float=True, bias_correction=False),
    "8-bit, percentile, bias correction (output)": dict(method="percentile", reduce_range=False,
                                                        bias_correction="output"),
    "7-bit dense / 8-bit depthwise, bias corr. (weights)": dict(method="percentile", reduce_range="dense"),
    "8-bit, bias corr. (weights), MSE weight clipping": dict(method="percentile", reduce_range=False,
                                                             weight_method="mse"),
    "8-bit, bias corr. (weights), 32 calibration images": dict(method="percentile", reduce_range=False, calib=32),
    "8-bit, bias corr. (weights), 256 calibration images": dict(method="percentile", reduce_range=False,
                                                                calib=256),
    # the recommended setting: 8-bit weights, percentile activations, bias correction (weights, the default)
    "default": dict(method="percentile", reduce_range=False),
}
DEFAULT = "default"
# the faster setting: 7-bit weights where AVX2's u8 x s8 kernel sums pairs (dense, linear), 8-bit depthwise
FAST = "7-bit dense / 8-bit depthwise, bias corr. (weights)"
TABLE = ("8-bit weights, percentile", FAST, DEFAULT)  # the rows without --sweep


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


def latency_and_size(label, model, graph, gq, x, calib, rounds, agree_on=None) -> dict:
    """Latency and file sizes of shave fp32 / int8 and ORT fp32 / int8; with `agree_on` (images, and
    the fp32 top-1 of each), also the top-1 agreement of the compiled shave int8 and ORT int8 models.
    `gq`: the int8 graph, or {engine name: int8 graph} for several settings side by side."""
    xn = x.numpy()
    extra = {}
    gq = gq if isinstance(gq, dict) else {"shave int8": gq}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cms = {"shave fp32": shave.compile(graph, (x,))} | {k: shave.compile(g, (x,)) for k, g in gq.items()}
        sizes = {k: cm.export(d / f"{k.replace(' ', '_')}.shave").stat().st_size for k, cm in cms.items()}
        sess, ort_sizes = ort_sessions(model, x, calib, d)
        sizes.update(ort_sizes)
        engines = dict(cms) | {k: (lambda a, s=s: s.run(None, {"input": a})) for k, s in sess.items()}
        ms = median_ms(engines, xn, rounds=rounds, runs=20)  # a pause before each engine's block
        if agree_on is not None:
            imgs, ref = agree_on
            for k, fn in [(k, lambda a, k=k: cms[k](a)) for k in gq] + [
                    ("ort int8", lambda a: sess["ort int8"].run(None, {"input": a}))]:
                top = torch.tensor([int(np.argmax(np.asarray(fn(imgs[i:i + 1].numpy())[0]))) for i in range(len(imgs))])
                extra[k] = top
    print(f"\n{label}: latency (ms, batch 1, median) and file size (bytes)")
    for k in ms:
        print(f"  {k:16s} {ms[k]:8.3f} ms   {sizes[k]:>10,d} B")
    return {"ms": ms, "bytes": sizes}, extra


def share_table(graph, imgs, ref_top) -> dict:
    """k-means weight sharing (ShareWeights) at 8/5/4/3 bits: rates, zlib sizes, errors, agreement."""
    from shave.passes import ShareWeights

    rows = {}
    print("\nMobileNetV2, k-means weight sharing (size only), 20 real images:")
    for bits in (8, 5, 4, 3):
        r = ShareWeights(bits=bits, data=[imgs]).apply(graph)
        p = r.plan
        top = predict(r.graph, imgs)
        rows[bits] = {"rate": p.total_rate, "model_rate": p.model_rate, "zlib": p.total_zlib,
                      "output_error": p.output_error, "agreement": float((top == ref_top).float().mean()) * 100}
        print(f"  {bits} bits: rate {p.total_rate:.2f}x (whole model {p.model_rate:.2f}x), weights' zlib size "
              f"{p.total_zlib[0]:,} -> {p.total_zlib[1]:,} B, output error {p.output_error:.3g}, "
              f"top-1 agreement {rows[bits]['agreement']:.0f} %", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--perturbed", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calib", type=int, default=CALIB)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="evaluate every MobileNetV2 setting of SWEEP")
    ap.add_argument("--share", action="store_true", help="also k-means weight sharing of MobileNetV2 (size only)")
    ap.add_argument("--quick", action="store_true", help="a short run (100 perturbed, 32 calibration images)")
    args = ap.parse_args(argv)
    if args.quick:
        args.perturbed, args.calib, args.rounds = min(args.perturbed, 100), min(args.calib, 32), 2
    torch.manual_seed(0)
    print(host_line())
    result = {}

    # 1. Fashion-MNIST
    model, source = trained_model(2)
    x, y = load_fashion_mnist("test")
    xt, _ = load_fashion_mnist("train")
    g = FoldBN()(shave.capture(model, (x[:1],)))
    calib = [xt[i:i + 64] for i in range(0, 256, 64)]
    acc = {"fp32": float((predict(g, x, 1000) == y).float().mean()) * 100}
    graphs = {}
    for method in ("minmax",) if args.quick else ("minmax", "percentile", "mse"):
        graphs[method] = Quantize(calib, method=method)(g)
        acc[f"int8 {method}"] = float((predict(graphs[method], x, 1000) == y).float().mean()) * 100
    print(f"Fashion-MNIST ResNet ({source}), test accuracy % on 10k images:")
    for k, v in acc.items():
        print(f"  {k:18s} {v:6.2f}  ({v - acc['fp32']:+.2f} pt)")
    result["fashion"] = {"accuracy": acc, "weights": source}
    if not args.skip_latency:
        result["fashion"].update(latency_and_size("Fashion-MNIST ResNet", model, g, graphs["minmax"], x[:1],
                                                  calib, args.rounds)[0])

    # 2. MobileNetV2
    mv2 = pretrained_mobilenet_v2().eval()
    imgs, labels = imagenet_samples()
    gm = FoldBN()(shave.capture(mv2, (imgs[:1],)))
    cal_all = perturbed_copies(imgs, max(args.calib, 256 if args.sweep else 0), seed=1)
    pert = perturbed_copies(imgs, args.perturbed, seed=2)
    evalset = torch.cat([imgs, pert])
    ref = predict(gm, evalset)

    def agreement(top) -> dict:
        return {"real20": float((top[:20] == ref[:20]).float().mean()) * 100,
                "perturbed": float((top[20:] == ref[20:]).float().mean()) * 100}

    agree, default_sim, sim_top, fast_sim = {}, None, None, None
    settings = SWEEP if args.sweep else {k: SWEEP[k] for k in TABLE}
    print(f"MobileNetV2: top-1 agreement with fp32 (%), 20 real images / {len(pert)} perturbed copies "
          f"(fake-quant simulation)", flush=True)
    for name, kw in settings.items():
        kw = dict(kw)
        ncal = kw.pop("calib", args.calib)
        cal = list(cal_all[:ncal].split(16))
        t0 = time.perf_counter()
        r = Quantize(cal, simulate=True, **kw).apply(gm)
        sim = r.graph
        seconds = time.perf_counter() - t0
        top = predict(sim, evalset)
        agree[name] = agreement(top) | {
            "int8_layers": sum(lq.quantized for lq in r.plan), "layers": len(r.plan),
            "calib": ncal, "quantize_seconds": seconds}
        print(f"  {name:44s} {agree[name]['real20']:5.1f} / {agree[name]['perturbed']:5.1f}   "
              f"({agree[name]['int8_layers']}/{agree[name]['layers']} layers int8, calibration {ncal} images, "
              f"{seconds:.0f} s)", flush=True)
        if name == DEFAULT:
            default_sim, sim_top = sim, top
        if name == FAST:
            fast_sim = sim
    result["mobilenet_v2"] = {"agreement": agree, "fp32_top1_vs_labels":
                              float((ref[:20] == torch.tensor(labels)).float().mean()) * 100}
    if not args.skip_latency:
        gq = {"shave int8": convert(default_sim)} | ({"shave int8 fast": convert(fast_sim)} if fast_sim else {})
        cal = list(cal_all[:args.calib].split(16))
        timing, tops = latency_and_size("MobileNetV2", mv2, gm, gq, imgs[:1], cal, args.rounds,
                                        agree_on=(evalset, ref))
        result["mobilenet_v2"].update(timing)
        setting = {"shave int8": DEFAULT, "shave int8 fast": FAST}
        for k, top in tops.items():
            a = agreement(top)
            result["mobilenet_v2"][f"{k} agreement"] = a
            print(f"  {k + ' (compiled, ' + setting[k] + ')' if k in setting else k + ' (quantize_static)':44s} "
                  f"{a['real20']:5.1f} / {a['perturbed']:5.1f}")
        same = float((tops["shave int8"] == sim_top).float().mean()) * 100
        result["mobilenet_v2"]["compiled_vs_simulation_top1_same"] = same
        print(f"  compiled shave int8 and its simulation give the same top-1 on {same:.1f} % of the images")
    if args.share:
        result["mobilenet_v2"]["share_weights"] = share_table(gm, imgs, ref[:20])
    OUT.mkdir(exist_ok=True)
    (OUT / "quantize.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
