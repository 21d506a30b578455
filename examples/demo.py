"""Compile the real ImageNet MobileNetV2 for this x86 CPU and check it.

Prints the compile report, the agreement of the compiled model with PyTorch
on the 20 labelled ImageNet images, then exports the artifact and runs it
again in a fresh process where torch cannot be imported; writes the report with
its plots and a kernel profile to out/report/.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402

import shave  # noqa: E402
from shave.testing import BLOCK_TORCH  # noqa: E402
from shave.zoo import imagenet_samples, pretrained_mobilenet_v2  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "out"

TORCH_FREE_RUN = BLOCK_TORCH + """
import numpy as np, shave
rt = shave.load(sys.argv[1])
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.concatenate([rt(images[i:i + 1]) for i in range(len(images))]))
print("torch imported:", "torch" in sys.modules)
"""


def main() -> None:
    torch.set_num_threads(2)
    model = pretrained_mobilenet_v2()
    images, labels = imagenet_samples()
    print(f"MobileNetV2 (ImageNet weights), {len(images)} labelled ImageNet images, target x86 "
          f"({shave.target.host_cpu()})\n")

    t0 = time.perf_counter()
    cm = shave.compile(model, (images[:1],), target="x86")
    print(f"compiled in {time.perf_counter() - t0:.1f} s\n")
    print(cm.report, "\n")

    with torch.no_grad():
        ref = model(images).numpy()
    out = np.concatenate([cm(images[i:i + 1].numpy()) for i in range(len(images))])
    err = np.abs(out - ref).max() / np.abs(ref).max()
    agree = int((out.argmax(1) == ref.argmax(1)).sum())
    acc_ref = int((ref.argmax(1) == np.array(labels)).sum())
    acc_out = int((out.argmax(1) == np.array(labels)).sum())
    print(f"top-1 agreement with PyTorch: {agree}/{len(images)}; max error {err:.2e} of the logit scale")
    print(f"top-1 accuracy vs labels: PyTorch {acc_ref}/{len(images)}, shave {acc_out}/{len(images)}")

    OUT.mkdir(exist_ok=True)
    path = cm.export(OUT / "mobilenet_v2.shave")
    np.save(OUT / "images.npy", images.numpy())
    print(f"\nartifact: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    subprocess.run([sys.executable, "-c", TORCH_FREE_RUN, str(path), str(OUT / "images.npy"),
                    str(OUT / "loaded.npy")], check=True)
    loaded = np.load(OUT / "loaded.npy")
    same = np.array_equal(loaded, out)
    print(f"loaded in a torch-free process: outputs {'identical' if same else 'DIFFERENT'} to the compiled model")

    x = images[:1].numpy()
    time.sleep(0.5)  # PyTorch's OpenMP workers spin for a while after its last op and would take the cores
    for _ in range(5):
        cm(x)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        cm(x)
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        for _ in range(3):
            model(images[:1])
        eager = []
        for _ in range(10):
            t = time.perf_counter()
            model(images[:1])
            eager.append(time.perf_counter() - t)
    saved = cm.report.save(OUT / "report", profile=cm.profile(x))
    print(f"\nreport with plots: {', '.join(str(p) for p in saved)}")
    print(f"\nlatency, batch 1, {cm.threads} threads (median): shave {np.median(times) * 1e3:.1f} ms, "
          f"PyTorch eager {np.median(eager) * 1e3:.1f} ms (default schedules, no tuning; see benchmarks/)")
    if agree != len(images) or err > 1e-4 or not same:
        sys.exit("demo check failed: the compiled model disagrees with PyTorch")


if __name__ == "__main__":
    main()
