"""Keep uint8 activations blocked ([N, C/8, H, W, 8]) between int8 conv kernels.

The int8 lowering (lower_quant.py) emits every quantized conv as a call_tir to its own kernel
reading and writing NCHW uint8. Here, a value that one int8 kernel writes and only int8 kernels
read (as their input or their residual) is made blocked instead: its producer writes the
8 channels of a pixel as one vector, a 1x1 consumer reads it in place (int8.reads_in_place),
other consumers pack from it with contiguous copies. Values with other readers (dequantize,
float ops, the graph's outputs, a linear layer's reshape) stay NCHW, as do channel counts
that are not a multiple of 8.
"""
from __future__ import annotations

import dataclasses

import tvm
from tvm import relax

from . import int8


def _qconv_calls(mod, func) -> dict:
    """{bound var: (call_tir value, QConvSpec)} of the int8 kernel calls in `func`."""
    out = {}
    for blk in func.body.blocks:
        for bd in blk.bindings:
            v = bd.value
            if not (isinstance(bd, relax.VarBinding) and isinstance(v, relax.Call)
                    and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.call_tir"):
                continue
            callee = mod[v.args[0]]
            if isinstance(callee, tvm.tirx.PrimFunc) and callee.attrs is not None and "shave.qconv" in callee.attrs:
                out[bd.var] = (v, int8.QConvSpec.from_json(str(callee.attrs["shave.qconv"])))
    return out


def _operands(call, spec):
    fields = list(call.args[1].fields)
    return [fields[0]] + ([fields[4]] if spec.residual else [])


def block_qconvs(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with the int8 kernels' uint8 activations blocked wherever only int8 kernels read them."""
    mains = [gv for gv in mod.get_global_vars() if gv.name_hint == "main"]
    func = mod[mains[0]] if mains else None
    if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
        return mod
    calls = _qconv_calls(mod, func)
    if len(calls) < 2:
        return mod
    uses = _uses(func)
    as_operand: dict = {}
    for call, spec in calls.values():
        for a in _operands(call, spec):
            if isinstance(a, relax.Var):
                as_operand[a] = as_operand.get(a, 0) + 1
    blocked = {v for v, (_, spec) in calls.items()
               if isinstance(v, relax.DataflowVar) and spec.out_dtype == "uint8" and spec.oc % int8.VO == 0
               and as_operand.get(v, 0) == uses.get(v, 0) > 0}
    if not blocked:
        return mod
    bb = relax.BlockBuilder(mod)
    new_var = {v: relax.DataflowVar(str(v.name) + "_blocked", relax.TensorType(
        dataclasses.replace(calls[v][1], out_blocked=True).out_shape(), "uint8")) for v in blocked}
    replace = {}
    for v, (call, spec) in calls.items():
        fields = list(call.args[1].fields)
        new = dataclasses.replace(spec, in_blocked=fields[0] in blocked, out_blocked=v in blocked,
                                  res_blocked=spec.residual and fields[4] in blocked)
        if new == spec:
            continue
        # "shave.replaces": the kernel this call made before (lower.follow_renames keeps the profile's
        # IR node names); one per new spec, since the kernels before had no blocked operand
        prim = int8.compute_primfunc(new).with_attr("shave.qconv", new.to_json()).with_attr(
            "shave.replaces", call.args[0].name_hint)
        gv = bb.add_func(prim, "shave_qconv")
        args = [new_var.get(a, a) if isinstance(a, relax.Var) else a for a in fields]
        call = relax.call_tir(gv, args, relax.TensorType(new.out_shape(), new.out_dtype))
        replace[v] = (new_var.get(v, v), bb.normalize(call))
    mod = bb.get()
    mod["main"] = rebind(func, replace)
    # drop the NCHW kernels nothing calls any more
    called = []
    _collect_called(mod["main"], called)
    for gv, f in list(mod.functions.items()):
        if (isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "shave.qconv" in f.attrs
                and not any(gv.same_as(c) for c in called)):
            del mod[gv]
    return mod


def _collect_called(func, out) -> None:
    for blk in func.body.blocks:
        for bd in blk.bindings:
            v = bd.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.call_tir":
                out.append(v.args[0])


def _collect_vars(expr, out):
    if isinstance(expr, relax.Var):
        out.append(expr)
    elif isinstance(expr, relax.Call):
        for a in expr.args:
            _collect_vars(a, out)
    elif isinstance(expr, relax.Tuple):
        for f in expr.fields:
            _collect_vars(f, out)
    elif isinstance(expr, relax.TupleGetItem):
        _collect_vars(expr.tuple_value, out)
    elif isinstance(expr, relax.SeqExpr):
        for b in expr.blocks:
            for bd in b.bindings:
                _collect_vars(bd.value, out)
        _collect_vars(expr.body, out)
    elif isinstance(expr, relax.If):
        for e in (expr.cond, expr.true_branch, expr.false_branch):
            _collect_vars(e, out)



def _uses(func):
    used = []
    _collect_vars(func.body, used)
    uses: dict = {}
    for v in used:
        uses[v] = uses.get(v, 0) + 1
    return uses



def rebind(func, replace: dict, drop=frozenset()):
    """`func` with the bindings of `replace`'s vars bound to (new var, new value) instead and
    the bindings of `drop`'s vars removed."""
    blocks = []
    for blk in func.body.blocks:
        bds = []
        for bd in blk.bindings:
            if isinstance(bd, relax.VarBinding):
                if bd.var in drop:
                    continue
                if bd.var in replace:
                    bd = relax.VarBinding(*replace[bd.var])
            bds.append(bd)
        blocks.append(relax.DataflowBlock(bds) if isinstance(blk, relax.DataflowBlock) else relax.BindingBlock(bds))
    new_body = relax.SeqExpr(blocks, func.body.body)
    return relax.Function(func.params, new_body, func.ret_ty if hasattr(func, "ret_ty") else None,
                          func.is_pure, func.attrs)
