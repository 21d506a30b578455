"""Run a compiled model: needs the TVM runtime and numpy, not torch."""
from __future__ import annotations

import os
import re
import tempfile
import threading
import time

import numpy as np

from .quiet import quiet_tvm
from .tvm_import import import_tvm
from .host import host_arch, host_cpu_flags
from ..errors import ArtifactError, InputError
from .artifact import LIB, read_artifact
from .launcher import MEMBER, call_slice, install, load_launcher
from .threads import ThreadGovernor, check_threads, pool_size, use_threads

# calls this long or longer run with the launcher's scheduler slice (launcher.c); a shorter call
# fits in the kernel's own slice, and setting and giving back the slice costs about 1 us
LONG_CALL_S = 200e-6


class Runtime:
    """A loaded model. `rt(*inputs)` takes numpy arrays (or anything np.asarray
    accepts) and returns a numpy array, or a tuple of them for several outputs.

    Safe to call from several threads: TVM's Relax VM keeps its registers in the VM
    object, so each calling thread runs its own VM over the one loaded library (the
    weights are shared, not copied: eight VMs of MobileNetV2 add 0.1 MiB).

    `threads`: how many threads one call runs on (default: every CPU the process may use,
    or TVM_NUM_THREADS / OMP_NUM_THREADS when set; runtime/threads.py); settable later.
    `adaptive` (default True): for a library on TVM's thread pool (an artifact of an older shave,
    or one built without a C compiler), drop to one thread while that is measured faster, as it
    is when other processes keep the CPUs busy and a static chunk waits for a descheduled worker
    (threads.ThreadGovernor); False always uses `threads`. A library on shave's launcher, whose
    chunks any thread takes, always runs on `threads`: there two threads were as fast as the
    governor or faster beside 2-16 CPU-bound processes, after them and between PyTorch calls
    (docs/tvm-notes.md, Thread pool); a library with no parallel loop runs on the calling thread.
    Once a call has taken LONG_CALL_S or more, the next ones set the calling thread's scheduler
    slice to the launcher's call slice for their length and give back the thread's own after
    (runtime/launcher.c; Linux 6.12 and later)."""

    def __init__(self, module, manifest: dict, threads: int | None = None, adaptive: bool = True):
        tvm = import_tvm()

        self.manifest = manifest
        self.inputs = [(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]
        self._dtypes = [np.dtype(d) for _, _, d in self.inputs]
        self.outputs = [(o["name"], tuple(o["shape"]), o["dtype"]) for o in manifest["outputs"]]
        # dynamic batch: {batch size: VM function} (compile(dynamic_batch=...)); {} for a static build
        self.batch_functions = {int(k): f for k, f in manifest.get("batch_functions", {}).items()}
        self._device = tvm.cuda(0) if manifest["target"]["arch"] == "cuda" else tvm.cpu()
        self._module = module
        self._local = threading.local()
        self.adaptive = adaptive and manifest["target"]["arch"] != "cuda"
        # only TVM's pool needs the governor: a library with no parallel loop runs on the calling
        # thread whatever the count, and on the launcher a descheduled worker holds up only the
        # chunk it has started (read per call: the property is fixed per library)
        self._tvm_pool = self.parallel == "tvm"
        # a call that took LONG_CALL_S or more makes the next one run with the launcher's longer
        # scheduler slice (set on the calling thread, given back after; runtime/launcher.c)
        self._slice = call_slice() if manifest["target"]["arch"] != "cuda" else None
        self._long = False
        self.threads = threads
        self._state()  # this thread's VM now: a library that cannot start fails here, not at the first call

    @property
    def threads(self) -> int:
        return self._threads

    @threads.setter
    def threads(self, n: int | None) -> None:
        n = check_threads(n)
        self._threads = min(n, pool_size()) if n is not None else pool_size()
        self.governor = ThreadGovernor(self._threads)

    def _state(self, batch: int | None = None) -> "_Function":
        """This thread's state of the function that runs `batch` samples (None: `main`, at the
        signature's batch), made on the thread's first call of it."""
        states = getattr(self._local, "states", None)
        if states is None:
            from tvm import relax

            self._local.vm = relax.VirtualMachine(self._module, self._device)
            states = self._local.states = {}
        state = states.get(batch)
        if state is None:
            tvm = import_tvm()
            fname = "main" if batch is None else self.batch_functions[batch]
            shapes = [shape if batch is None else (batch,) + shape[1:] for _, shape, _ in self.inputs]
            bufs = [tvm.runtime.empty(shape, dtype, self._device) for shape, (_, _, dtype) in zip(shapes, self.inputs)]
            on_cpu = self._device.dlpack_device_type() == 1
            state = states[batch] = _Function(self._local.vm[fname], bufs, on_cpu)
        return state

    @property
    def parallel(self) -> str:
        """What the kernels' parallel loops run on: "launcher" (shave's, tasks claimed at run time:
        runtime/launcher.py), "tvm" (TVM's thread pool) or "serial" (the model has none)."""
        return getattr(self._module, "_shave_parallel", "tvm")

    @property
    def launcher(self) -> bool:
        """Whether the kernels' parallel loops run on shave's launcher."""
        return self.parallel == "launcher"

    @property
    def dynamic_batch(self) -> bool:
        """Whether one call takes any batch size (compiled with dynamic_batch)."""
        return bool(self.batch_functions)

    def chunks(self, n: int) -> list[int]:
        """The batch sizes a batch of `n` runs as, in order: the largest compiled sizes first
        (every dynamic build has batch 1), e.g. 21 -> [8, 8, 1, 1, 1, 1, 1] with sizes (1, 8)."""
        out = []
        for size in sorted(self.batch_functions, reverse=True):
            k, n = divmod(n, size)
            out += [size] * k
        return out

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _, _ in self.outputs]

    def bind(self, args, named: dict) -> tuple:
        """Positional `args` followed by `named` inputs (by input name), in the model's input order."""
        if not named:
            return tuple(args)
        names = self.input_names
        unknown = [k for k in named if k not in names]
        if unknown:
            raise InputError(f"unknown input name(s) {unknown}; the model's inputs are {names}")
        given = dict(zip(names, args))
        twice = [k for k in named if k in given]
        if twice:
            raise InputError(f"input(s) {twice} given both by position and by name")
        given.update(named)
        missing = [k for k in names if k not in given]
        if missing:
            raise InputError(f"missing input(s) {missing}; the model's inputs are {names}")
        return tuple(given[k] for k in names)

    def _check(self, args) -> list[np.ndarray]:
        if len(args) != len(self.inputs):
            raise InputError(f"model takes {len(self.inputs)} input(s) "
                             f"({', '.join(n for n, _, _ in self.inputs)}), got {len(args)}")
        arrays, batch = [], None
        for a, (name, shape, dtype), want in zip(args, self.inputs, self._dtypes):
            a = np.asarray(a)
            ok = a.shape == shape
            if self.batch_functions:  # any batch size: axis 0 is free, the same for every input
                ok = a.ndim == len(shape) and a.shape[1:] == shape[1:] and a.shape[0] >= 1 and batch in (None, a.shape[0])
                batch = a.shape[0] if ok else batch
            if not ok or a.dtype != want:
                dims = ",".join(["N" if self.batch_functions else str(shape[0])] + [str(d) for d in shape[1:]])
                extra = f" (N: one batch size for all inputs, here {batch})" if self.batch_functions and batch else ""
                raise InputError(f"input {name!r}: expected {dtype}[{dims}], "
                                 f"got {a.dtype}[{','.join(map(str, a.shape))}]{extra}")
            arrays.append(a)
        return arrays

    def run(self, *args) -> list[np.ndarray]:
        arrays = self._check(args)
        batch = arrays[0].shape[0] if self.batch_functions and arrays else None
        governed = self.adaptive and self._tvm_pool
        threads = self.governor.pick() if governed else self._threads
        use_threads(threads, self._tvm_pool)
        had = self._slice[0](self._slice[1]) if self._long and self._slice is not None else -1
        t0 = time.perf_counter()
        try:
            outs = self._run(batch, arrays)
        finally:
            seconds = time.perf_counter() - t0
            if had >= 0:
                self._slice[0](had)
        self._long = seconds >= LONG_CALL_S
        if governed:  # per sample, so calls of different batch sizes compare
            self.governor.record(threads, seconds / (batch or 1))
        return outs

    def _run(self, batch: int | None, arrays: list) -> list[np.ndarray]:
        if batch is None:
            outs = self._run_one(None, arrays)
        elif batch in self.batch_functions:
            outs = self._run_one(batch, arrays)
        else:  # a batch no function has: run it in chunks of the compiled sizes
            parts, at = [], 0
            for k in self.chunks(batch):
                parts.append(self._run_one(k, [a[at:at + k] for a in arrays]))
                at += k
            outs = [np.concatenate(ys) for ys in zip(*parts)]
        return outs

    def _run_one(self, batch: int | None, arrays: list) -> list[np.ndarray]:
        """One VM call of the function for `batch` (None: main) on arrays of its shapes."""
        return self._state(batch).run(arrays)

    def __call__(self, *args, **named):
        """The outputs (one array, or a tuple of them) for inputs by position and/or by name
        (`rt(x)`, `rt(x=x)`: `input_names`)."""
        outs = self.run(*self.bind(args, named))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def example_inputs(self, seed: int = 0, batch: int | None = None) -> list[np.ndarray]:
        """Random inputs of the signature's shapes (standard normal floats; zeros for integers),
        at batch size `batch` if given (another than the signature's: a dynamic-batch model)."""
        rng = np.random.default_rng(seed)
        if batch is not None and self.inputs and batch != self.inputs[0][1][0] and not self.batch_functions:
            raise InputError(f"this model takes batch {self.inputs[0][1][0]} only (compile it with "
                             f"dynamic_batch=True for any batch size), asked for {batch}")
        shapes = [shape if batch is None else (batch,) + shape[1:] for _, shape, _ in self.inputs]
        return [rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f" else np.zeros(shape, dtype)
                for shape, (_, _, dtype) in zip(shapes, self.inputs)]

    def benchmark(self, *inputs, repeats: int = 100, warmup: int = 5) -> dict:
        """Latency of single calls on `inputs` (default: example_inputs()): {"p10", "p50", "p90",
        "mean", "min"} in ms over `repeats` timed calls after `warmup` untimed ones, and "calls"."""
        if repeats < 1 or warmup < 0:
            raise InputError(f"benchmark needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
        args = list(inputs) if inputs else self.example_inputs()
        for _ in range(warmup):
            self.run(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.run(*args)
            times.append(time.perf_counter() - t0)
        ms = np.asarray(times) * 1e3
        return {"p10": float(np.percentile(ms, 10)), "p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
                "mean": float(ms.mean()), "min": float(ms.min()), "calls": repeats}

    def profile(self, *inputs, repeats: int = 10):
        """Where a call's time goes, kernel by kernel (runtime/profile.py): a Profile, printable."""
        from .profile import profile

        return profile(self, inputs, repeats)

    @property
    def report(self):
        from .report import Report

        return Report.from_dict(self.manifest.get("report", {}))


class _Function:
    """One VM function as one thread calls it: the entry point, the input tensors it is called
    on, numpy views of them (None on a GPU). The input tensors are reused call after call:
    copying into them costs about 1 us where allocating an aligned TVM tensor per call cost 37
    (a LeNet-sized model ran 134 us a call, 65 after). What the first call learns is kept: whether
    an output is a view of an input (an identity or reshape of one), which the caller must get
    as a copy since the input's buffer is overwritten next call."""

    __slots__ = ("main", "bufs", "views", "small", "aliased", "bare")

    def __init__(self, main, bufs: list, on_cpu: bool):
        self.main, self.bufs = main, bufs
        self.views = [np.from_dlpack(b) for b in bufs] if on_cpu else None
        # inputs this small are always copied (the shapes are the function's own)
        self.small = on_cpu and any(v.nbytes < IN_PLACE_BYTES for v in self.views)
        self.aliased = None  # per output: a view of an input? (known after the first call)
        self.bare = None  # whether the function returns its one output bare, not in a tuple

    def run(self, arrays: list) -> list[np.ndarray]:
        views = self.views
        if views is None:  # GPU memory: copied in and out
            for b, a in zip(self.bufs, arrays):
                b.copyfrom(np.ascontiguousarray(a))
            r = self.main(*self.bufs)
            return [r.numpy()] if isinstance(r, import_tvm().runtime.Tensor) else [o.numpy() for o in r]
        args = None if self.small else _in_place(arrays, self.bufs)
        if args is None:
            for v, a in zip(views, arrays):
                v[...] = a
            args = self.bufs
        # each output is the VM's fresh tensor, kept alive by its numpy array: no copy (indexed:
        # iterating the VM's tuple cost 1.5 us of Python per call, indexing 0.7)
        r = self.main(*args)
        if self.bare is None:
            self.bare = isinstance(r, import_tvm().runtime.Tensor)
        # one output: the tensor itself (an artifact of an older shave: a tuple of one)
        outs = [np.from_dlpack(r)] if self.bare else [np.from_dlpack(r[i]) for i in range(len(r))]
        aliased = self.aliased
        if aliased is None:
            aliased = self.aliased = [any(np.may_share_memory(y, v) for v in views + arrays) for y in outs]
        if True in aliased:
            outs = [y.copy() if a else y for y, a in zip(outs, aliased)]
        return outs


# Inputs smaller than this are copied: a copy costs about 1 us there, while wrapping an array
# through DLPack (and checking its alignment) cost about 10 us of Python per call.
IN_PLACE_BYTES = 1 << 16


def _in_place(arrays: list, bufs: list) -> list | None:
    """The arrays themselves as TVM tensors (DLPack, no copy) when every one is at least
    IN_PLACE_BYTES, C-contiguous, 64-byte aligned (what the compiled kernels assume) and of its
    buffer's dtype (the caller checked the dtypes); else None (the caller copies them into its
    aligned buffers). Torch's and numpy's own allocations of that size are aligned so; slices and
    transposes are not."""
    if any(a.nbytes < IN_PLACE_BYTES for a in arrays):
        return None
    tvm = import_tvm()
    out = []
    for a in arrays:
        if not (a.flags.c_contiguous and a.__array_interface__["data"][0] % 64 == 0):
            return None
        try:
            out.append(tvm.runtime.from_dlpack(a))
        except Exception:  # e.g. a read-only array, which DLPack cannot export
            return None
    return out


_HOST_TARGET = {"x86_64": "x86", "aarch64": "arm64"}


def _cuda_gpu_mismatch(target: dict) -> str | None:
    """Why this machine cannot run CUDA code built for `target`, or None if it can."""
    tvm = import_tvm()

    arch = target.get("dict", {}).get("arch", "")
    try:
        dev = tvm.cuda(0)
        present = dev.exist
    except Exception:  # TVM's CUDA runtime is not loaded: no driver (libcuda.so.1) on this machine
        present = False
    if not present:
        return (f"built for CUDA {arch} (target {target.get('name')!r}), but this machine has no CUDA GPU "
                "(no driver or no device visible to TVM)")
    have = "sm_" + str(dev.compute_version).replace(".", "")
    if int(have[3:]) < int(re.sub(r"\D", "", arch) or 0):
        return f"built for CUDA {arch} (target {target.get('name')!r}), but this machine's GPU is {have}"
    return None


def target_mismatch(target: dict) -> str | None:
    """Why code built for `target` (a manifest's target record) cannot run here, or None."""
    arch = target.get("arch")
    if arch == "cuda":
        host = str(target.get("dict", {}).get("host", {}).get("mtriple", "")).split("-")[0] or host_arch()
        if host != host_arch():
            return f"built for CUDA with {host} host code (target {target.get('name')!r}), but this machine is {host_arch()}"
        return _cuda_gpu_mismatch(target)
    if arch != host_arch():
        return (f"built for {arch} (target {target.get('name')!r}), but this machine is {host_arch()}; "
                f"run it on {arch}, or rebuild it for this machine (target={_HOST_TARGET.get(host_arch(), 'a TVM target dict')!r})")
    missing = [f for f in target.get("cpu_features", []) if f not in host_cpu_flags()]
    if missing and host_cpu_flags():
        return (f"built for CPU {target.get('dict', {}).get('mcpu')!r} and needs "
                f"{', '.join(missing)}, which this CPU lacks; rebuild for target 'x86-64' or this host")
    return None


def check_target(manifest: dict, path) -> None:
    reason = target_mismatch(manifest.get("target", {}))
    if reason:
        raise ArtifactError(f"{path}: {reason}")


def load_library(data: bytes, origin="compiled library", launcher: bool = True):
    """Load a compiled library from its bytes (written to a temp file for dlopen); its parallel
    loops run on the process's launcher where one is loaded and `launcher` (runtime/launcher.py),
    else on TVM's thread pool."""
    tvm = import_tvm()

    fd, lib_path = tempfile.mkstemp(suffix=".so", prefix="shave-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            with quiet_tvm():
                module = tvm.runtime.load_module(lib_path)
        except Exception as e:
            raise ArtifactError(f"{origin}: the compiled library does not load: "
                                f"{str(e).strip().splitlines()[-1]}") from None
        module._shave_parallel = install(lib_path) if launcher else "tvm"
        return module
    finally:
        os.unlink(lib_path)  # already mapped into the process


def load(path, threads: int | None = None, adaptive: bool = True) -> Runtime:
    """Load an artifact file written by CompiledModel.export; `threads`, `adaptive`: see Runtime."""
    threads = check_threads(threads)
    manifest, members = read_artifact(path)
    check_target(manifest, path)
    load_launcher(members.get(MEMBER))
    return Runtime(load_library(members[LIB], path), manifest, threads, adaptive)
