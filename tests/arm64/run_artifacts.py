"""Load shave artifacts and run them on saved inputs, in one process.

    run_artifacts.py ARTIFACT INPUT.npy OUTPUT.npy [ARTIFACT INPUT.npy OUTPUT.npy ...]

Meant to run under qemu-aarch64 with the aarch64 Python of tools/arm64-root.sh:
it uses only shave's torch-free runtime, TVM's runtime and numpy, and checks
that it really is on aarch64 and that torch was never imported. Starting
Python and TVM under emulation takes tens of seconds, so one process runs
every artifact it is given.
"""
import platform
import sys
import time

import numpy as np

import shave

assert platform.machine() == "aarch64", f"expected to run on aarch64, this is {platform.machine()}"
args = sys.argv[1:]
if not args or len(args) % 3:
    sys.exit(__doc__)
for artifact, inp, out in zip(args[0::3], args[1::3], args[2::3]):
    t0 = time.perf_counter()
    rt = shave.load(artifact)
    t1 = time.perf_counter()
    y = rt(np.load(inp))
    np.save(out, y)
    print(f"{artifact}: target {rt.manifest['target']['name']}, loaded in {t1 - t0:.1f} s, "
          f"ran in {time.perf_counter() - t1:.2f} s (emulated)", flush=True)
assert "torch" not in sys.modules
