#!/usr/bin/env python
"""Run a benchmark as on an AVX2 host, on an x86 host with AVX-512.

    python benchmarks/avx2_host.py benchmarks/families.py --models resnet18 --batches 1
    python benchmarks/avx2_host.py --check            # what each engine sees, then exit

The development machine is sometimes an AVX2-only CPU and sometimes an AVX-512 one. To measure
the AVX2 code paths of every engine on the latter, this builds cpuid_mask.c (with the host's C
compiler, cached under out/cpuid_mask/) and runs the given script with it preloaded: the CPUID
instruction then reports no AVX-512, AVX-VNNI or AMX, in this process, its threads and its
children. Each engine chooses its kernels from CPUID as it would on such a host: ONNX Runtime's
MLAS and PyTorch (oneDNN, cpuinfo) take their AVX2 paths, and shave's target "x86" turns off the
features the host does not report (shave/target.py), so it builds 8-lane code with 16 registers.
The benchmark's host line says the CPUID was masked. The CPU underneath is still the AVX-512 one
(its caches, clocks and AVX2 throughput): read the figures as AVX2 code on this CPU, not as a
measurement of another CPU. Needs Linux's CPUID faulting (the `cpuid_fault` flag in
/proc/cpuinfo; most KVM guests and Intel CPUs since Ivy Bridge, AMD since Zen 3 on recent kernels).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "cpuid_mask.c"
MARK = "SHAVE_BENCH_CPUID_MASK"  # set for the benchmark: common.host_line reports it


def build() -> Path:
    """The shim library, built once per source."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    lib = HERE.parent / "out" / "cpuid_mask" / f"cpuid_mask-{digest}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-ldl"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"building {SOURCE.name} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(tmp, lib)
    return lib


CHECK = """
import torch, shave
from shave.target import resolve_target
from shave.isa import isa
print("PyTorch CPU capability:", torch.backends.cpu.get_cpu_capability())
print("shave target x86:", isa(resolve_target("x86")).describe())
print("LLVM host features with avx512:", sorted(f for f in shave.target.host_cpu_features() if "avx512" in f) or "none")
"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError as e:
        raise SystemExit(f"cannot read /proc/cpuinfo ({e}): masking CPUID needs Linux on x86") from None
    if "cpuid_fault" not in flags:
        raise SystemExit("this host has no CPUID faulting (no cpuid_fault flag in /proc/cpuinfo): CPUID cannot be masked")
    if "avx2" not in flags:
        raise SystemExit("this host has no AVX2")
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(build()), env.get("LD_PRELOAD")]))
    env[MARK] = "avx2"
    cmd = [sys.executable, "-c", CHECK] if argv[0] == "--check" else [sys.executable, "-u", *argv]
    sys.stdout.flush()
    os.execve(sys.executable, cmd, env)  # the benchmark becomes this process: its exit status, its signals


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
