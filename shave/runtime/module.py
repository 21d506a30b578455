"""Run a compiled model: needs the TVM runtime and numpy, not torch."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ..backends.tvm.quiet import quiet_tvm
from ..backends.tvm.target import host_arch, host_cpu_flags
from ..errors import ArtifactError, InputError
from .artifact import LIB, read_artifact


class Runtime:
    """A loaded model. `rt(*inputs)` takes numpy arrays (or anything np.asarray
    accepts) and returns a numpy array, or a tuple of them for several outputs."""

    def __init__(self, module, manifest: dict):
        import tvm
        from tvm import relax

        self.manifest = manifest
        self.inputs = [(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]
        self.outputs = [(o["name"], tuple(o["shape"]), o["dtype"]) for o in manifest["outputs"]]
        self._device = tvm.cpu() if manifest["target"]["arch"] != "cuda" else tvm.cuda()
        self._vm = relax.VirtualMachine(module, self._device)
        self._main = self._vm["main"]

    def _check(self, args) -> list[np.ndarray]:
        if len(args) != len(self.inputs):
            raise InputError(f"model takes {len(self.inputs)} input(s) "
                             f"({', '.join(n for n, _, _ in self.inputs)}), got {len(args)}")
        arrays = []
        for a, (name, shape, dtype) in zip(args, self.inputs):
            a = np.asarray(a)
            if a.shape != shape or a.dtype != np.dtype(dtype):
                raise InputError(f"input {name!r}: expected {dtype}[{','.join(map(str, shape))}], "
                                 f"got {a.dtype}[{','.join(map(str, a.shape))}]")
            arrays.append(a)
        return arrays

    def run(self, *args) -> list[np.ndarray]:
        import tvm

        # tvm.runtime.tensor copies into memory aligned the way TVM kernels assume
        ins = [tvm.runtime.tensor(np.ascontiguousarray(a), self._device) for a in self._check(args)]
        out = self._main(*ins)
        return [o.numpy() for o in out]

    def __call__(self, *args):
        outs = self.run(*args)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @property
    def report(self):
        from ..report import Report

        return Report.from_dict(self.manifest.get("report", {}))


def check_target(manifest: dict, path) -> None:
    target = manifest.get("target", {})
    arch = target.get("arch")
    if arch != "cuda" and arch != host_arch():
        raise ArtifactError(f"{path}: built for {arch} (target {target.get('name')!r}), "
                            f"but this machine is {host_arch()}")
    missing = [f for f in target.get("cpu_features", []) if f not in host_cpu_flags()]
    if missing and host_cpu_flags():
        raise ArtifactError(f"{path}: built for CPU {target.get('dict', {}).get('mcpu')!r} and needs "
                            f"{', '.join(missing)}, which this CPU lacks; rebuild for target 'x86-64' or this host")


def load_library(data: bytes, origin="compiled library"):
    """Load a compiled library from its bytes (written to a temp file for dlopen)."""
    import tvm

    fd, lib_path = tempfile.mkstemp(suffix=".so", prefix="shave-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            with quiet_tvm():
                return tvm.runtime.load_module(lib_path)
        except Exception as e:
            raise ArtifactError(f"{origin}: the compiled library does not load: "
                                f"{str(e).strip().splitlines()[-1]}") from None
    finally:
        os.unlink(lib_path)  # already mapped into the process


def load(path) -> Runtime:
    """Load an artifact file written by CompiledModel.export."""
    manifest, members = read_artifact(path)
    check_target(manifest, path)
    return Runtime(load_library(members[LIB], path), manifest)
