"""Targets: friendly names -> TVM target dicts, what architecture and CPU features a target needs.

Host facts the runtime also needs (architecture, CPU flags) live in runtime/host.py."""
from __future__ import annotations

import os
import re

from .errors import TargetError
from .runtime.host import host_arch

# Feature flags (from /proc/cpuinfo) that code built for an LLVM CPU needs.
# Only the ones that decide whether generated x86 code can execute are listed.
# LLVM's feature name -> /proc/cpuinfo's.
_X86_FEATURES = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw",
                 "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni"}


def host_cpu() -> str:
    import tvm

    return str(tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")())


def host_cpu_features() -> set[str]:
    """The features LLVM finds on this host through CPUID (its names: avx2, avx512f, avxvnni, ...)."""
    import tvm

    return {str(k) for k, v in tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")().items() if v}


# Vector instruction-set extensions (LLVM names, by prefix) that the kernels' code generation uses.
_VECTOR_FEATURES = ("avx", "amx", "fma", "f16c", "gfni", "vaes", "vpclmulqdq", "sse", "ssse", "xop")


def host_missing_features(mcpu: str, host: set[str] | None = None) -> list[str]:
    """Vector features LLVM's CPU `mcpu` implies that this host's CPUID does not report: a VM
    that hides AVX-512 from a guest on an AVX-512 CPU, an OS without AVX-512 state enabled."""
    import tvm

    host = host_cpu_features() if host is None else host
    implied = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))}
    return sorted(f for f in implied - host if f.startswith(_VECTOR_FEATURES))


def _x86_host() -> dict:
    """This host's CPU as LLVM names it, less the vector features its CPUID does not report
    (LLVM names the CPU by family and model: a guest shown no AVX-512 on a Zen 5 is still znver5)."""
    if host_arch() != "x86_64":
        raise TargetError(f"target 'x86' means this x86_64 host, but this machine is {host_arch()}; "
                          "pass a TVM target dict to cross-compile")
    mcpu = host_cpu()
    spec = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": os.cpu_count() or 1}
    missing = host_missing_features(mcpu)
    if missing:
        spec["mattr"] = [f"-{f}" for f in missing]
    return spec


def _arm(mcpu: str, mattr: list[str], cores: int) -> dict:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": mattr, "num-cores": cores}


# aarch64 boards and servers: LLVM CPU name and features (NEON: 4 fp32 lanes).
ARM_TARGETS = {
    "arm64": lambda: _arm("generic", ["+neon"], 4),  # any ARMv8-A with NEON
    "rpi4": lambda: _arm("cortex-a72", ["+neon"], 4),  # Raspberry Pi 4
    "rpi5": lambda: _arm("cortex-a76", ["+neon", "+dotprod"], 4),  # Raspberry Pi 5
    "graviton2": lambda: _arm("neoverse-n1", ["+neon", "+dotprod"], 64),  # AWS Graviton2
}

# NVIDIA GPUs by product name -> compute capability.
GPU_ARCHS = {"t4": "sm_75", "a100": "sm_80", "a10": "sm_86", "rtx3090": "sm_86", "l4": "sm_89",
             "rtx4090": "sm_89", "h100": "sm_90", "h200": "sm_90", "b200": "sm_100"}


def _cuda(arch: str) -> dict:
    """A CUDA target for compute capability `arch` ('sm_90'); host code for this machine's
    architecture at its baseline instruction set, so the artifact runs beside any GPU host."""
    host = {"x86_64": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"},
            "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic"}}.get(host_arch())
    if host is None:
        raise TargetError(f"target cuda needs an x86_64 or aarch64 host to build on, this machine is {host_arch()}")
    return {"kind": "cuda", "arch": arch, "max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
            "thread_warp_size": 32, "host": host}


def _cuda_detected() -> dict:
    import tvm

    dev = tvm.cuda(0)
    if not dev.exist:
        raise TargetError("target 'cuda' takes the GPU's arch from this machine, which has no CUDA GPU; "
                          f"name it instead: 'sm_90', or one of {', '.join(GPU_ARCHS)}")
    return _cuda("sm_" + str(dev.compute_version).replace(".", ""))


TARGETS = {
    "x86": _x86_host,  # this host's x86_64 CPU, with its vector extensions
    "x86-64": lambda: {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64",
                       "num-cores": os.cpu_count() or 1},  # any x86_64 (SSE2 only)
    **ARM_TARGETS,
    "cuda": _cuda_detected,  # this machine's GPU
    **{name: (lambda a=arch: _cuda(a)) for name, arch in GPU_ARCHS.items()},
}


def _named(name: str):
    if name in TARGETS:
        return TARGETS[name]()
    m = re.fullmatch(r"(?:cuda[:/-])?(sm_\d{2,3}[a-z]?)", name)
    if m:
        return _cuda(m.group(1))
    return None


def resolve_target(target) -> dict:
    """A friendly name or a TVM target dict -> a validated TVM target dict."""
    import tvm

    if isinstance(target, str):
        spec = _named(target)
        if spec is None:
            raise TargetError(f"unknown target {target!r}; known names: {', '.join(TARGETS)}, sm_XX "
                              "(or a TVM target dict)")
    elif isinstance(target, dict):
        spec = dict(target)
    else:
        raise TargetError(f"target must be a name or a TVM target dict, got {type(target).__name__}")
    try:
        tvm.target.Target(spec)
    except Exception as e:
        raise TargetError(f"TVM rejects target {spec}: {str(e).strip().splitlines()[-1]}") from None
    if spec.get("kind") == "llvm" and "mtriple" not in spec:
        # the wheel's default triple ignores mcpu; make the triple explicit
        spec["mtriple"] = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(host_arch(), "")
    return spec


def target_arch(spec: dict) -> str:
    """The machine architecture a target dict generates code for ('x86_64', 'aarch64', 'cuda', ...)."""
    if spec.get("kind") != "llvm":
        return str(spec.get("kind"))
    triple = spec.get("mtriple", "")
    return triple.split("-")[0] or host_arch()


def required_features(spec: dict) -> list[str]:
    """CPU feature flags the generated code will use, as /proc/cpuinfo names them."""
    if target_arch(spec) != "x86_64":
        return []
    import tvm

    mcpu = spec.get("mcpu", "")
    if not mcpu or mcpu == "x86-64":
        return []
    try:
        feats = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(spec))
        names = {str(f) for f in feats}
    except Exception:
        return []
    return [cpuinfo for llvm, cpuinfo in _X86_FEATURES.items() if llvm in names]
