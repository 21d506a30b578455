"""int8 with hardswish / hardsigmoid / SiLU / sigmoid fused into the int8 layers vs computed as
separate float ops (dequantize, float kernel, quantize), beside the fp32 build; torchvision
models (random init, seed 0), 8 random calibration images, batch 1, medians of interleaved rounds.

    python benchmarks/int8_activations.py [model ...]   (default: mobilenet_v3_small mobilenet_v3_large efficientnet_b0)
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import host_line  # noqa: E402

MODELS = ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=list(MODELS))
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import torch

    import shave
    import shave.passes.quantize.quantize as qmod
    from shave.passes import Quantize
    from shave.zoo import torchvision_models

    print(host_line())
    tv = torchvision_models()
    print("| model | fp32 | int8, activations separate | int8, fused | fused / separate | fused / fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        torch.manual_seed(0)
        m = getattr(tv, name)().eval()
        x = torch.randn(1, 3, 224, 224)
        gen = torch.Generator().manual_seed(1)
        cal = [torch.randn(1, 3, 224, 224, generator=gen) for _ in range(8)]
        g = shave.capture(m, (x,))
        cms = {"fp32": shave.compile(g, (x,), passes=["fold_bn"])}
        fused = qmod._fusable
        for label, fusable in (("separate", qmod._clamps_around_zero), ("fused", fused)):
            qmod._fusable = fusable  # which activations an int8 layer takes into its epilogue
            try:
                cms[label] = shave.compile(g, (x,), passes=["fold_bn", Quantize(cal)])
            finally:
                qmod._fusable = fused
        xs = x.numpy()
        for cm in cms.values():
            for _ in range(3):
                cm(xs)
        samples = {k: [] for k in cms}
        for _ in range(args.rounds):
            for k, cm in cms.items():
                t = time.perf_counter()
                for _ in range(10):
                    cm(xs)
                samples[k].append((time.perf_counter() - t) / 10 * 1e3)
        med = {k: float(np.median(v)) for k, v in samples.items()}
        print(f"| {name} | {med['fp32']:.2f} ms | {med['separate']:.2f} ms | {med['fused']:.2f} ms | "
              f"{med['fused'] / med['separate']:.2f}x | {med['fused'] / med['fp32']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
