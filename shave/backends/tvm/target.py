"""Friendly target names -> TVM target dicts, and facts about the host."""
from __future__ import annotations

import os
import platform

from ...errors import TargetError

# Feature flags (from /proc/cpuinfo) that code built for an LLVM CPU needs.
# Only the ones that decide whether generated x86 code can execute are listed.
# LLVM's feature name -> /proc/cpuinfo's.
_X86_FEATURES = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw",
                 "avx512vnni": "avx512_vnni"}


def host_cpu() -> str:
    import tvm

    return str(tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")())


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _x86_host() -> dict:
    if host_arch() != "x86_64":
        raise TargetError(f"target 'x86' means this x86_64 host, but this machine is {host_arch()}; "
                          "pass a TVM target dict to cross-compile")
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": host_cpu(), "num-cores": os.cpu_count() or 1}


TARGETS = {
    "x86": _x86_host,  # this host's x86_64 CPU, with its vector extensions
    "x86-64": lambda: {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64",
                       "num-cores": os.cpu_count() or 1},  # any x86_64 (SSE2 only)
}


def resolve_target(target) -> dict:
    """A friendly name or a TVM target dict -> a validated TVM target dict."""
    import tvm

    if isinstance(target, str):
        if target not in TARGETS:
            raise TargetError(f"unknown target {target!r}; known names: {', '.join(TARGETS)} (or a TVM target dict)")
        spec = TARGETS[target]()
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
