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


def workspace_calls_in_parallel_loops(executable) -> int:
    """Parallel loop bodies (`__tvm_parallel_lambda` functions) of a compiled kernel's LLVM IR
    that allocate from TVM's workspace pool; raises if the kernel has no parallel loop."""
    ir = executable.jit().inspect_source("ll")
    lambdas = [f for f in ir.split("\ndefine ") if "parallel_lambda" in f.split("\n", 1)[0]]
    assert lambdas, "no parallel loop in the kernel"
    return sum("@__TVMBackendAllocWorkspace" in f for f in lambdas)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_configure(config):
    sys.path.insert(0, os.path.dirname(__file__))
