"""The lowering table: IR op name -> a function emitting the op's Relax, and the helpers the
lowerings share. lower_float.py and lower_quant.py fill the table; lower.py drives it."""
from __future__ import annotations

from contextvars import ContextVar

import numpy as np
import tvm
from tvm import relax

R = relax.op
LOWERINGS = {}


def lowers(*ops):
    """Register a lowering of `ops`."""
    def deco(fn):
        for op in ops:
            LOWERINGS[op] = fn
        return fn

    return deco


def _f32(v) -> relax.Constant:
    return relax.const(np.float32(v), "float32")


def constant_value(e: relax.Expr) -> np.ndarray | None:
    """The array of a Relax constant (a model parameter), else None."""
    return e.value.numpy() if isinstance(e, tvm.ir.expr.Constant) else None


def reshape(v: relax.Expr, shape) -> relax.Expr:
    """R.reshape, done here in numpy where `v` is a constant: an op on constants alone is a
    kernel FoldConstant would compile and run at build time (DenseNet-121's 62 unfused batch
    norms made 434 of them, a third of its compile time)."""
    c = constant_value(v)
    return R.reshape(v, shape) if c is None else relax.const(np.ascontiguousarray(c.reshape(shape)))


def _channel(v: relax.Expr, ndim: int, axis: int = 1) -> relax.Expr:
    """Reshape a per-channel vector so it broadcasts along `axis` of an ndim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return reshape(v, shape)


def _shape(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape.values)


# The int8 dot product (shave.isa INT8_DOTS) the graph is being lowered for: it decides how int8
# conv weights are packed (lower_quant). Without a target, AVX2's (the packing every x86 target
# can run; the schedule falls back to plain code elsewhere).
LOWERING_DOT: ContextVar = ContextVar("shave_lowering_dot", default="avx2")

# The CPU the graph is being lowered for (a shave.isa.ISA), or None (no target, or a GPU): ops
# with a kernel of their own on CPUs (attention's matmuls: schedules/matmul.py) read it.
LOWERING_CPU: ContextVar = ContextVar("shave_lowering_cpu", default=None)
