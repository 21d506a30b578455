"""TVM's lowering of Relax ops to TIR, constant folding and operator fusion: what every
target's default schedules start from (within a target scope)."""
from __future__ import annotations

import tvm
from tvm import relax


def legalize_and_fuse(mod: tvm.IRModule) -> tvm.IRModule:
    return tvm.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])(mod)
