import os
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("TVM_NUM_THREADS", "2")
torch.set_num_threads(2)

from shave.testing import BLOCK_TORCH  # noqa: F401  (tests import it from here)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_configure(config):
    sys.path.insert(0, os.path.dirname(__file__))
