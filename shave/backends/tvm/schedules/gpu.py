"""Default CUDA schedules: TVM's legalization and fusion, then dlight's GPU rules.

Each fused PrimFunc gets the first rule that accepts it, in this order:

* `Matmul`: matmul-like reductions, convolutions included. It rewrites a conv
  as an implicit GEMM (the `reindex` stages turn the (channel, kh, kw)
  reduction and the (n, oh, ow) output into GEMM axes without materialising an
  im2col buffer), tiles it over thread blocks, stages both operands through
  shared memory and keeps a register tile per thread; the fused bias,
  residual and activation run in the epilogue.
* `GEMV`, `Reduction`, `GeneralReduction`: vector products, pooling and other
  reductions (warp shuffles / shared-memory trees).
* `Fallback`: elementwise and injective ops (and whatever is left), flattened
  onto blockIdx.x / threadIdx.x.

`schedule_gpu(mod, target, rules_used)` fills `rules_used` with
{kernel name: rule name}, so what each kernel became can be checked. A rule
that raises is skipped; a PrimFunc no rule takes is an error (an unscheduled
kernel would not bind any thread and fails in the CUDA codegen anyway).
"""
from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl

from ....errors import CompileError
from .legalize import legalize_and_fuse


def _rules():
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def schedule_gpu(mod: tvm.IRModule, target: dict, rules_used: dict | None = None) -> tvm.IRModule:
    tgt = tvm.target.Target(target)
    with tgt:
        mod = legalize_and_fuse(mod)
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs and func.attrs.get("tirx.is_scheduled"):
                continue
            for rule in _rules():
                try:
                    sch = rule.apply(func, tgt, False)
                except Exception:
                    sch = None
                if sch is None:
                    continue
                sch = sch[0] if isinstance(sch, list) else sch
                updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                if rules_used is not None:
                    rules_used[gv.name_hint] = type(rule).__name__
                break
            else:
                raise CompileError(f"no GPU schedule rule applies to kernel {gv.name_hint}")
        for gv, func in updated.items():
            mod[gv] = func
    return mod
