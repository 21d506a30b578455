"""What a target's instruction set offers the kernels: one description, read once from LLVM.

    isa(target) -> ISA        # target: a name ('x86', 'rpi5', ...) or a TVM target dict

Everything that sizes code for a CPU reads this instead of testing features itself: the
fp32 conv kernels' vector width and register budget (backends/tvm/schedules), the int8
kernels' dot-product instruction, Prune's and Decompose's `round_to="auto"`, Quantize's
`reduce_range="auto"`, and the benchmarks' peak FLOP/s.

The features come from TVM's own query of LLVM (`llvm_get_cpu_features` on the target: its
`mcpu` and `mattr`), never from the machine the compiler runs on, so a kernel built for
`{"mcpu": "icelake-server"}` on an AVX2 laptop is the AVX-512 VNNI kernel. (TVM's
`llvm_get_vector_width` answers 512 for every x86 CPU in 0.27, AVX2-only ones included,
so the width is read from the features.)

int8 dot products, from best to none:
- `avx512_vnni`: vpdpbusd, u8 x s8 products summed by 4 into int32 lanes, no saturation
  (AVX-512 VNNI with VL: ymm and zmm forms; `avx_vnni`: the VEX ymm form, e.g. Alder Lake).
- `avx2`: vpmaddubsw + vpmaddwd, whose int16 pair sums saturate unless |w| <= 64
  (so 8-bit weights need the int16 variant, half the multiply-adds per instruction).
- `neon_dot`: Arm sdot/udot (ARMv8.2 `+dotprod`), same-signed bytes summed by 4 into int32.
- `none`: plain int32 lanes.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["ISA", "isa", "compiling_for", "pass_target"]

INT8_DOTS = ("avx512_vnni", "avx_vnni", "avx2", "neon_dot", "none")
# CPUs that run a 512-bit FMA as two 256-bit halves on their two FMA pipes (AMD Zen 4): one zmm
# FMA per cycle, the same 32 fp32 FLOP per cycle as two ymm FMAs
HALF_RATE_512 = frozenset({"znver4"})


@dataclass(frozen=True)
class ISA:
    arch: str  # "x86_64", "aarch64", or the target kind for non-CPU targets ("cuda")
    cpu: str  # LLVM's CPU name (mcpu)
    features: frozenset  # LLVM feature names
    fp32_lanes: int  # fp32 lanes of the widest vector register the kernels use (1: no SIMD)
    vector_registers: int  # architectural vector registers (16 ymm, 32 zmm, 32 NEON)
    fma_pipes: int  # vector FMA issue per cycle per core (the peak figure; the default conv register tile)
    int8_dot: str  # one of INT8_DOTS

    @property
    def fp32_flops_per_cycle(self) -> int:
        """Peak fp32 FLOP per cycle per core: lanes x 2 (multiply + add) x FMA pipes."""
        return self.fp32_lanes * 2 * self.fma_pipes

    @property
    def int8_pairs_saturate(self) -> bool:
        """Whether the u8 x s8 dot product sums pairs in int16 (vpmaddubsw), which saturates
        for 8-bit weights: 7-bit weights (|w| <= 64) keep it exact."""
        return self.int8_dot == "avx2"

    @property
    def slow_int32_multiply(self) -> bool:
        """Whether a vector int32 multiply (vpmulld) is slow next to an FMA: two uops and 10 cycles'
        latency on Intel's cores (one uop, 3 cycles on AMD's Zen). Depthwise int8 kernels then run
        their taps as float32 FMAs on a float32 copy of the input (schedules/int8.py, fp32_taps)."""
        return self.arch == "x86_64" and not self.cpu.startswith(("znver", "bdver", "btver"))

    @property
    def channel_multiple(self) -> int:
        """Channel counts that fill whole vectors (what `round_to="auto"` rounds to); 8 on GPUs."""
        return 8 if self.arch == "cuda" else self.fp32_lanes

    def describe(self) -> str:
        return (f"{self.arch} {self.cpu}: {self.fp32_lanes} fp32 lanes, {self.vector_registers} vector "
                f"registers, int8 dot {self.int8_dot}")


def _x86(cpu: str, feats: set) -> ISA:
    if "avx512f" in feats:
        lanes, regs = 16, 32
    elif "avx" in feats:
        lanes, regs = 8, 16
    else:
        lanes, regs = 4, 16  # SSE2, the x86-64 baseline
    if "avx512vnni" in feats and "avx512vl" in feats:
        dot = "avx512_vnni"
    elif "avxvnni" in feats:
        dot = "avx_vnni"
    elif "avx2" in feats:
        dot = "avx2"
    else:
        dot = "none"
    pipes = 2 if "fma" in feats else 1
    if lanes == 16 and cpu in HALF_RATE_512:
        pipes = 1
    return ISA("x86_64", cpu, frozenset(feats), lanes, regs, pipes, dot)


def _aarch64(cpu: str, feats: set) -> ISA:
    return ISA("aarch64", cpu, frozenset(feats), 4, 32, 2, "neon_dot" if "dotprod" in feats else "none")


@lru_cache(maxsize=64)
def _isa(key: str) -> ISA:
    spec = json.loads(key)
    if spec.get("kind") != "llvm":
        return ISA(str(spec.get("kind")), "", frozenset(), 1, 0, 1, "none")
    import tvm

    try:
        feats = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(spec))}
    except Exception:  # an LLVM without this target: no features known
        feats = set()
    cpu = str(spec.get("mcpu", "generic"))
    triple = str(spec.get("mtriple", ""))
    if triple.startswith(("aarch64", "arm64")):
        return _aarch64(cpu, feats)
    if triple.startswith(("x86_64", "i686", "i386")) or (not triple and feats & {"sse2", "avx"}):
        return _x86(cpu, feats)
    return ISA(triple.split("-")[0] or "unknown", cpu, frozenset(feats), 1, 16, 1, "none")


def isa(target="x86") -> ISA:
    """The ISA of `target`: a target name (resolved as shave.compile does) or a TVM target dict."""
    if not isinstance(target, dict):
        from .target import resolve_target

        target = resolve_target(target)
    return _isa(json.dumps(target, sort_keys=True, default=str))


_COMPILE_TARGET: ContextVar = ContextVar("shave_compile_target", default=None)


@contextmanager
def compiling_for(target):
    """Within this block, passes that size their choices for a target and were given none
    (`pass_target(None)`) use `target`: shave.compile runs its passes under its own target."""
    token = _COMPILE_TARGET.set(target)
    try:
        yield
    finally:
        _COMPILE_TARGET.reset(token)


def pass_target(explicit=None):
    """The target a pass plans for: its own `target=` if given, else that of the shave.compile
    running it, else this machine ('x86' on x86_64, 'arm64' on aarch64)."""
    if explicit is not None:
        return explicit
    current = _COMPILE_TARGET.get()
    if current is not None:
        return current
    from .target import host_arch

    return "arm64" if host_arch() == "aarch64" else "x86"
