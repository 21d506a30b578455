import os
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("TVM_NUM_THREADS", "2")
torch.set_num_threads(2)

# A snippet that makes `import torch` fail, for checking torch-free code paths in a subprocess.
BLOCK_TORCH = """
import sys, importlib.abc
class _BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not importable in this process")
sys.meta_path.insert(0, _BlockTorch())
"""


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_configure(config):
    sys.path.insert(0, os.path.dirname(__file__))
