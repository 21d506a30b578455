"""Import TVM for running an artifact without importing torch.

TVM's ffi package imports torch whenever it is installed (to find torch's DLPack
exchange), which costs seconds at start-up that a runtime, a CLI or a serverless
function never needs. A process that has not imported torch gets TVM without it;
torch imported later still works beside it, and tensors still pass between them
through the standard DLPack protocol (np.from_dlpack, torch.from_dlpack)."""
from __future__ import annotations

import sys


def import_tvm():
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm

        return tvm
    sys.modules["torch"] = None  # `import torch` inside TVM's ffi raises ImportError, which it handles
    try:
        import tvm
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tvm
