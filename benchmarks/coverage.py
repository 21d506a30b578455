#!/usr/bin/env python
"""Coverage of torchvision: which classification and segmentation models shave captures, compiles,
prunes and quantizes, and how fast the compiled ones run beside ONNX Runtime.

    python benchmarks/coverage.py                            # every model below (about 20 minutes)
    python benchmarks/coverage.py --models resnet18,fcn_resnet50 --json out/coverage.json

For each model (torchvision's definition, random weights after torch.manual_seed(0), batch 1,
224x224 or the model's own size): capture; compile with the default passes and compare with
eager (max error relative to the output scale); Prune(ratio=0.3) on the captured graph;
Quantize on one calibration batch (the pass; not compiled); then shave and ONNX Runtime timed
in interleaved rounds with each engine's default threads (medians). A step that fails shows
the first line of its error; later steps that need it are skipped. Segmentation models return
a dict; they are wrapped to return its tensors in order.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_shave_importable, host_line, markdown_table, measure, onnxruntime_engine  # noqa: E402

CLASSIFICATION = ["alexnet", "vgg11_bn", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2",
                  "densenet121", "googlenet", "inception_v3", "squeezenet1_0", "mobilenet_v2",
                  "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet1_0", "shufflenet_v2_x1_0",
                  "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
                  "vit_b_16", "swin_t"]
SEGMENTATION = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
SIZES = {"inception_v3": 299}


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:160]


def _model(name: str):
    import torch

    from shave.zoo import torchvision_models

    tv = torchvision_models()
    torch.manual_seed(0)
    if name in SEGMENTATION:
        import torchvision.models.segmentation as seg

        extra = {} if name.startswith("lraspp") else {"aux_loss": False}  # lraspp has no aux head
        inner = getattr(seg, name)(weights=None, weights_backbone=None, **extra)  # nothing downloaded

        class Outputs(torch.nn.Module):  # the dict of outputs as a tuple
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return tuple(self.m(x).values())

        return Outputs(inner).eval()
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    return getattr(tv, name)(weights=None, **kwargs).eval()


def run_one(name: str, calls: int, rounds: int) -> dict:
    import numpy as np
    import torch

    import shave
    from shave.passes import Prune, Quantize

    row = {"model": name, "capture": "-", "compile": "-", "prune": "-", "quantize": "-"}
    size = SIZES.get(name, 224)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        model = _model(name)
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["capture"] = f"cannot build: {_first_line(e)}"
        return row
    t0 = time.perf_counter()
    try:
        graph = shave.capture(model, (x,))
        row["capture"] = f"ok ({len(graph.nodes)} nodes, {time.perf_counter() - t0:.0f} s)"
    except Exception as e:  # noqa: BLE001
        row["capture"] = _first_line(e)
        return row
    try:
        t0 = time.perf_counter()
        cm = shave.compile(graph, (x,))
        with torch.no_grad():
            ref = model(x)
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        out = cm(x.numpy())
        out = list(out) if isinstance(out, tuple) else [out]
        err = max(float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-12)) for o, r in zip(out, ref))
        row["compile"] = f"ok, error {err:.1e} ({time.perf_counter() - t0:.0f} s)"
        row["error"] = err
    except Exception as e:  # noqa: BLE001
        row["compile"] = _first_line(e)
        cm = None
    try:
        pruned = Prune(ratio=0.3).apply(graph)
        row["prune"] = f"ok, {graph.stats()['flops'] / 1e9:.2f} -> {pruned.graph.stats()['flops'] / 1e9:.2f} GFLOPs"
    except Exception as e:  # noqa: BLE001
        row["prune"] = _first_line(e)
    try:
        q = Quantize([x]).apply(graph)
        n_int8 = sum(1 for e in q.plan if e.quantized)
        row["quantize"] = f"ok, {n_int8}/{len(q.plan)} layers int8"
    except Exception as e:  # noqa: BLE001
        row["quantize"] = _first_line(e)
    if cm is not None:
        try:
            ort = onnxruntime_engine(model, x, None).call
            xn = x.numpy()
            times = {"shave": [], "onnxruntime": []}
            for r in range(rounds):
                for k, fn in (("shave", cm), ("onnxruntime", ort))[:: 1 if r % 2 == 0 else -1]:
                    time.sleep(0.3)
                    times[k].append(measure(lambda: fn(xn), warmup=1, repeats=calls, budget_s=60.0,
                                            min_repeats=calls)[0].median)
            row["shave_ms"] = statistics.median(times["shave"])
            row["ort_ms"] = statistics.median(times["onnxruntime"])
        except Exception as e:  # noqa: BLE001
            row["ort"] = _first_line(e)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(CLASSIFICATION + SEGMENTATION))
    ap.add_argument("--calls", type=int, default=10, help="timed calls per engine and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    ensure_shave_importable()
    print(host_line(), flush=True)
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        try:
            row = run_one(name, args.calls, args.rounds)
        except Exception as e:  # noqa: BLE001 - one model's surprise must not end the table
            traceback.print_exc()
            row = {"model": name, "capture": _first_line(e)}
        rows.append(row)
        print(f"{name}: {json.dumps(row)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    table, notes = [], []

    def cell(text: str, short: str) -> str:
        """`short` for a step that worked, else a numbered note holding its error."""
        if text is None or text == "-":
            return "-"
        if text.startswith("ok"):
            return short
        notes.append(text)
        return f"failed ({len(notes)})"

    for r in rows:
        lat = (f"{r['shave_ms']:.2f}", f"{r['ort_ms']:.2f}", f"{r['shave_ms'] / r['ort_ms']:.2f}x") \
            if "shave_ms" in r else ("-", "-", "-")
        cap = r["capture"]
        comp = r.get("compile", "-")
        table.append([r["model"], cell(cap, cap[4:-1].split(",")[0] if cap.startswith("ok (") else "ok"),
                      cell(comp, comp[4:]), cell(r.get("prune", "-"), r.get("prune", "")[4:]),
                      cell(r.get("quantize", "-"), r.get("quantize", "")[4:]), *lat])
    print()
    print(markdown_table(["model", "capture", "compile: error vs eager (time)", "Prune(0.3)",
                          "Quantize (the pass)", "shave ms", "ORT ms", "shave / ORT"], table, right={5, 6, 7}))
    for i, text in enumerate(notes, 1):
        print(f"\n({i}) {text}", end="")
    print()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
