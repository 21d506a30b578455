import os
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("TVM_NUM_THREADS", "2")
torch.set_num_threads(2)

from shave.testing import BLOCK_TORCH  # noqa: F401  (tests import it from here)


# Explicit targets, one per instruction-set path, for tests that must not depend on the host's CPU
# (the development and CI machines are AVX2-only AMD or AVX-512 VNNI Intel). Every path is built and
# its assembly checked on any host; the code is run only where `runs_here` says the host can.
AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "num-cores": 2}
AVX512_VNNI = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "icelake-server", "num-cores": 2}
AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512", "num-cores": 2}  # no VNNI
NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}
NEON_DOT = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"],
            "num-cores": 4}


def runs_here(target: dict) -> bool:
    """Whether code built for `target` can execute on this machine (same architecture, and every
    CPU feature the code needs is in /proc/cpuinfo)."""
    from shave.runtime.module import target_mismatch
    from shave.target import required_features, target_arch

    return target_mismatch({"arch": target_arch(target), "cpu_features": required_features(target),
                            "name": "test", "dict": target}) is None


def asm_of(executable) -> str:
    """The assembly of every LLVM module a compiled kernel or library holds."""
    mods = [executable.mod] + list(executable.mod.imports)
    return "".join(m.inspect_source("asm") for m in mods if m.kind == "llvm")


def run_cli(*args, cwd=None):
    """`python -m shave.cli ARGS` in a subprocess (captured, text)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "shave.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def rewrite_artifact(src, dst, edit_manifest=None, edit_lib=None):
    """A copy of artifact `src` at `dst` with its manifest and/or library edited (no checksums
    redone); its other members copied as they are."""
    import json
    import zipfile

    with zipfile.ZipFile(src) as z:
        manifest, lib = json.loads(z.read("manifest.json")), z.read("lib.so")
        others = {n: z.read(n) for n in z.namelist() if n not in ("manifest.json", "lib.so")}
    if edit_manifest:
        edit_manifest(manifest)
    if edit_lib:
        lib = edit_lib(lib)
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("lib.so", lib)
        for name, data in others.items():
            z.writestr(name, data)
    return dst


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture
def parallel_kernels(monkeypatch):
    """Every compute kernel parallel, whatever its work (schedules/parallel.py): the kernel tests'
    small specs would otherwise all run the serial path, while a model's large kernels run the
    parallel one."""
    from shave.backends.tvm.schedules import parallel

    monkeypatch.setattr(parallel, "MIN_PARALLEL_WORK", 0)


def parallel_lambdas(executable) -> list[str]:
    """The parallel loop bodies (`__tvm_parallel_lambda` functions) of a compiled module's LLVM IR."""
    ir = executable.jit().inspect_source("ll")
    return [f for f in ir.split("\ndefine ") if "parallel_lambda" in f.split("\n", 1)[0]]


def workspace_calls_in_parallel_loops(executable) -> int:
    """Parallel loop bodies (`__tvm_parallel_lambda` functions) of a compiled kernel's LLVM IR
    that allocate from TVM's workspace pool; raises if the kernel has no parallel loop."""
    lambdas = parallel_lambdas(executable)
    assert lambdas, "no parallel loop in the kernel"
    return sum("@__TVMBackendAllocWorkspace" in f for f in lambdas)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_configure(config):
    sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def tracker():
    """A TVM RPC tracker with one CPU server registered under key 'shave-test', on loopback."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tr = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    sv = rpc.Server(host="127.0.0.1", port=9300, port_end=9400, key="shave-test",
                    tracker_addr=("127.0.0.1", tr.port), silent=True)
    import time

    for _ in range(50):  # wait until the server has registered
        if "shave-test" in rpc.connect_tracker("127.0.0.1", tr.port).summary().get("queue_info", {}):
            break
        time.sleep(0.2)
    yield tr.port
    sv.terminate()
    tr.terminate()
