"""Where a call's time goes: a per-kernel profile of a loaded model.

The profile runs the model on a VM of its own with TVM's instrument hook, which calls back
before and after every function the VM calls: shave's conv kernels (the IR nodes each one
computes come from the artifact's manifest, recorded when it was lowered), TVM's fused
kernels for everything else, and the VM's builtins (allocation, shape checks; one row).
Each kernel call site is timed over `repeats` runs and its median kept; GFLOP/s and the
fraction of the target's fp32 peak (threads x FLOPs per cycle x clock) are given where the
FLOPs are known. The hook costs a few microseconds per call; the uninstrumented time of a
whole call is given beside the kernels' sum.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class KernelCall:
    kernel: str  # the function the VM called
    nodes: list  # the IR nodes it computes (conv kernels; empty where unknown)
    shape: tuple  # its output's shape
    ms: float  # median over the runs
    flops: int = 0

    @property
    def gflops(self) -> float | None:
        return self.flops / self.ms / 1e6 if self.flops and self.ms > 0 else None


@dataclass
class Profile:
    calls: list[KernelCall]  # every kernel call of one run, in order (the VM's builtins summed in one row)
    call_ms: float  # median wall time of a whole uninstrumented call
    threads: int
    peak_gflops: float | None = None  # the target's fp32 peak on `threads` cores, where the clock is known
    runs: int = 0
    notes: list = field(default_factory=list)

    @property
    def kernel_ms(self) -> float:
        return sum(c.ms for c in self.calls)

    def by_kernel(self) -> list[tuple[str, int, float]]:
        """(kernel, calls, ms) summed over the calls of each kernel, slowest first."""
        out: dict = {}
        for c in self.calls:
            n, ms = out.get(c.kernel, (0, 0.0))
            out[c.kernel] = (n + 1, ms + c.ms)
        return sorted(((k, n, ms) for k, (n, ms) in out.items()), key=lambda r: -r[2])

    def table(self, top: int | None = None) -> str:
        """The kernel calls, slowest first: kernel, IR nodes, output shape, ms, share, GFLOP/s, % peak."""
        rows = sorted(self.calls, key=lambda c: -c.ms)[:top]
        total = self.kernel_ms or 1.0
        head = f"{'kernel':28} {'ms':>8} {'share':>6} {'GFLOP/s':>8} {'% peak':>7}  {'output':22} IR nodes"
        lines = [head, "-" * len(head)]
        for c in rows:
            g = c.gflops
            peak = f"{100 * g / self.peak_gflops:6.1f}%" if g and self.peak_gflops else "      -"
            lines.append(f"{c.kernel[:28]:28} {c.ms:8.3f} {100 * c.ms / total:5.1f}% "
                         f"{(f'{g:8.1f}' if g else '       -')} {peak}  {str(list(c.shape))[:22]:22} "
                         f"{', '.join(c.nodes)[:80]}")
        return "\n".join(lines)

    def __str__(self) -> str:
        peak = f", fp32 peak {self.peak_gflops:.0f} GFLOP/s" if self.peak_gflops else ""
        return (f"{len(self.calls)} kernel calls, {self.kernel_ms:.3f} ms summed (instrumented), "
                f"{self.call_ms:.3f} ms per call uninstrumented; {self.threads} threads{peak}; "
                f"median of {self.runs} runs\n" + self.table())


BUILTIN = "vm builtins (allocation, checks)"


def profile(runtime, inputs, repeats: int = 10) -> Profile:
    """Profile `runtime` (a shave Runtime) on `inputs` (numpy arrays, as a call takes them)."""
    from tvm import relax

    from .host import cpu_mhz

    if runtime._device.dlpack_device_type() != 1:
        raise NotImplementedError("the kernel profile times CPU models only")
    runtime.run(*inputs)  # checks the inputs and sets this thread's pool
    main_batch = runtime.inputs[0][1][0] if runtime.inputs else None
    if runtime.batch_functions and np.shape(inputs[0])[0] != main_batch:
        from ..errors import InputError

        raise InputError(f"the kernel profile runs the signature's batch size ({main_batch}); "
                         f"got a batch of {np.shape(inputs[0])[0]}")
    walls = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        runtime.run(*inputs)
        walls.append(time.perf_counter() - t0)
    from .threads import use_threads

    use_threads(runtime.threads, tvm_pool=runtime._tvm_pool)  # the full count, whatever the governor chose last
    vm = relax.VirtualMachine(runtime._module, runtime._device)
    arrays = [np.ascontiguousarray(a) for a in runtime._check(inputs)]
    import tvm

    args = [tvm.runtime.tensor(a, runtime._device) for a in arrays]
    runs: list[list] = []
    starts: dict = {}

    def hook(func, name, before, ret, *call_args):
        name = str(name)
        if before:
            starts[name] = time.perf_counter()
        else:
            dt = time.perf_counter() - starts.pop(name)
            shape = tuple(int(d) for d in call_args[-1].shape) if call_args and hasattr(call_args[-1], "shape") else ()
            runs[-1].append((name, dt, shape))
        return 0

    vm.set_instrument(hook)
    for i in range(max(1, repeats) + 1):
        runs.append([])
        vm["main"](*args)
    runs = runs[1:]  # the first run warms up
    sites = [(n, s) for n, _, s in runs[0]]
    if any([(n, s) for n, _, s in r] != sites for r in runs):
        raise RuntimeError("the VM called its kernels in a different order from run to run")
    times = np.median(np.array([[dt for _, dt, _ in r] for r in runs]), axis=0) * 1e3
    recorded: dict = {}
    for entry in runtime.manifest.get("kernels", []):
        recorded.setdefault(entry["kernel"], []).append(entry)
    seen: dict = {}
    calls, builtin_ms, builtins = [], 0.0, 0
    for (name, shape), ms in zip(sites, times):
        if name.startswith("vm."):
            builtin_ms, builtins = builtin_ms + float(ms), builtins + 1
            continue
        k = seen.get(name, 0)
        seen[name] = k + 1
        entry = recorded.get(name, [])[k] if k < len(recorded.get(name, [])) else {}
        calls.append(KernelCall(name, list(entry.get("nodes", [])), shape, float(ms), int(entry.get("flops", 0))))
    if builtin_ms:
        calls.append(KernelCall(BUILTIN, [f"{builtins} calls"], (), builtin_ms))
    mhz, per_cycle = cpu_mhz(), runtime.manifest["target"].get("fp32_flops_per_cycle")
    peak = runtime.threads * per_cycle * mhz / 1e3 if mhz and per_cycle else None
    return Profile(calls, float(np.median(walls)) * 1e3, runtime.threads, peak, len(runs))
