"""Relax rewrite: conv2d + bias [+ residual] [+ relu/clip] -> one call_tir to a scheduled kernel."""
from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from .conv import ConvSpec, build_primfunc, pack_weight

_Const = tvm.ir.expr.Constant


def _shape(expr):
    try:
        return tuple(int(d) for d in expr.ty.shape.values)
    except Exception:
        return None


def _dtype(expr):
    try:
        return str(expr.ty.dtype)
    except Exception:
        return None


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


def _is_op(expr, name):
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _const_value(expr, var2val):
    """numpy value of a Constant, or of a var bound to reshape(Constant) / a Constant."""
    if isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    if isinstance(expr, _Const):
        return expr.value.numpy(), None
    if _is_op(expr, "relax.reshape") and isinstance(expr.args[0], _Const):
        return expr.args[0].value.numpy(), expr
    return None, None


def _conv_spec(call, vec):
    """A ConvSpec for a conv2d call this rewrite can handle, else None."""
    a = call.attrs
    x, w = call.args
    if not isinstance(w, _Const):
        return None
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return None
    if _dtype(x) != "float32" or _dtype(w) != "float32" or (a.out_dtype is not None and str(a.out_dtype) not in ("", "float32", "void")):
        return None
    xs, ws = _shape(x), _shape(w)
    if xs is None or ws is None or len(xs) != 4:
        return None
    n, c, h, wd = xs
    oc, icg, kh, kw = ws
    groups = int(a.groups)
    if groups == 1 and icg == c:
        depthwise = False
    elif groups == c and icg == 1 and oc == c:
        depthwise = True
    else:
        return None
    pad = tuple(int(p) for p in a.padding)
    if len(pad) == 2:
        pad = pad * 2
    spec = ConvSpec(n, c, h, wd, oc, kh, kw, tuple(int(s) for s in a.strides), pad,
                    tuple(int(d) for d in a.dilation), depthwise, None, False, vec)
    if spec.oh < 1 or spec.ow < 1:
        return None
    return spec


def _folded_shift(x, var2val, consumers, uses, claimed):
    """(shift var, its input, DY, DX) when the conv input `x` is a shift (lower.py's
    shave_shift kernel) that nothing else reads, else None."""
    value = var2val.get(x) if isinstance(x, relax.Var) else None
    if (value is None or not _is_op(value, "relax.call_tir") or x in claimed or uses.get(x, 0) != 1
            or len(consumers.get(x, [])) != 1 or not value.args[0].name_hint.startswith("shave_shift")):
        return None
    src, dy, dx = value.args[1].fields
    if not (isinstance(dy, _Const) and isinstance(dx, _Const)):
        return None
    return x, src, dy, dx


def fuse_convs(mod: tvm.IRModule, vec: int, kernels: dict | None = None, tiles: dict | None = None) -> tvm.IRModule:
    """Replace every fusable conv chain in every Relax function of `mod`.
    `kernels`, if given, is filled with {ConvSpec: GlobalVar} of the kernels made;
    `tiles` maps a ConvSpec (with tile=None) to the register tile to use instead of the default."""
    kernels = {} if kernels is None else kernels
    tiles = tiles or {}
    new_funcs = {}
    bb = relax.BlockBuilder(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            new = _rewrite_function(func, vec, kernels, bb, tiles)
            if new is not None:
                new_funcs[gv] = new
    mod = bb.get()
    for gv, f in new_funcs.items():
        mod[gv] = f
    return mod


def _rewrite_function(func, vec, kernels, bb, tiles):
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return None
    var2val = {}
    uses: dict = {}
    for blk in body.blocks:
        for bd in blk.bindings:
            if isinstance(bd, relax.VarBinding):
                var2val[bd.var] = bd.value
    used = []
    _collect_vars(body, used)
    for v in used:
        uses[v] = uses.get(v, 0) + 1
    consumers: dict = {}
    for blk in body.blocks:
        for bd in blk.bindings:
            if isinstance(bd, relax.VarBinding):
                vs = []
                _collect_vars(bd.value, vs)
                for v in vs:
                    consumers.setdefault(v, []).append(bd.var)

    claimed: set = set()

    def sole_consumer(v):
        cs = consumers.get(v, [])
        if uses.get(v, 0) == 1 and len(cs) == 1 and cs[0] not in claimed:
            return cs[0]
        return None

    replace: dict = {}  # tail var -> new value
    drop: set = set()
    for blk in body.blocks:
        if not isinstance(blk, relax.DataflowBlock):
            continue
        for bd in blk.bindings:
            if not (isinstance(bd, relax.VarBinding) and _is_op(bd.value, "relax.nn.conv2d")) or bd.var in claimed:
                continue
            spec = _conv_spec(bd.value, vec)
            if spec is None:
                continue
            chain = [bd.var]
            out_shape = (spec.n, spec.oc, spec.oh, spec.ow)
            if _shape(bd.var) != out_shape:
                continue
            bias = np.zeros(spec.oc, np.float32)
            residual = None
            act = None
            cur = bd.var
            # bias
            nxt = sole_consumer(cur)
            if nxt is not None and _is_op(var2val[nxt], "relax.add") and _shape(nxt) == out_shape:
                other = [x for x in var2val[nxt].args if not x.same_as(cur)]
                if len(other) == 1:
                    val, reshape_call = _const_value(other[0], var2val)
                    if (val is not None and val.size == spec.oc and val.dtype == np.float32
                            and (val.ndim == 1 or val.shape[-3:] == (spec.oc, 1, 1))):
                        bias = val.reshape(-1).astype(np.float32)
                        if reshape_call is not None and isinstance(other[0], relax.Var) and uses.get(other[0]) == 1:
                            drop.add(other[0])
                        chain.append(nxt)
                        cur = nxt
            # residual
            nxt = sole_consumer(cur)
            if nxt is not None and _is_op(var2val[nxt], "relax.add") and _shape(nxt) == out_shape:
                other = [x for x in var2val[nxt].args if not x.same_as(cur)]
                if (len(other) == 1 and isinstance(other[0], relax.Var) and _shape(other[0]) == out_shape
                        and _dtype(other[0]) == "float32"):
                    residual = other[0]
                    chain.append(nxt)
                    cur = nxt
            # activation
            nxt = sole_consumer(cur)
            if nxt is not None:
                v = var2val[nxt]
                if _is_op(v, "relax.nn.relu"):
                    act = "relu"
                elif _is_op(v, "relax.clip") and len(v.args) == 3:
                    try:
                        lo, hi = float(v.args[1].value), float(v.args[2].value)
                        act = f"clip:{lo!r}:{hi!r}"
                    except Exception:
                        act = None
                if act is not None:
                    chain.append(nxt)
                    cur = nxt
            spec = ConvSpec(**{**spec.__dict__, "act": act, "residual": residual is not None})
            shift = _folded_shift(bd.value.args[0], var2val, consumers, uses, claimed)
            if shift is not None:
                spec = dataclasses.replace(spec, shift=True)
            if spec in tiles:
                spec = dataclasses.replace(spec, tile=tuple(tiles[spec]))
            try:
                gv = kernels.get(spec)
                if gv is None:
                    name = f"shave_conv{len(kernels)}"
                    prim = build_primfunc(spec).with_attr("op_pattern", 8).with_attr("global_symbol", name)
                    gv = bb.add_func(prim, name)
                    kernels[spec] = gv
                wp = pack_weight(spec, bd.value.args[1].value.numpy())
            except Exception:
                continue
            args = [bd.value.args[0], relax.const(wp), relax.const(bias)]
            if residual is not None:
                args.append(residual)
            if shift is not None:  # the conv reads the shift's input; the shift binding goes
                args[0] = shift[1]
                args += shift[2:]
                drop.add(shift[0])
                claimed.add(shift[0])
            claimed.update(chain)
            replace[cur] = bb.normalize(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))
            drop.update(chain[:-1])

    if not replace:
        return None
    blocks = []
    for blk in body.blocks:
        bds = []
        for bd in blk.bindings:
            if isinstance(bd, relax.VarBinding):
                if bd.var in drop:
                    continue
                if bd.var in replace:
                    bd = relax.VarBinding(bd.var, replace[bd.var])
            bds.append(bd)
        blocks.append(relax.DataflowBlock(bds) if isinstance(blk, relax.DataflowBlock) else relax.BindingBlock(bds))
    new_body = relax.SeqExpr(blocks, body.body)
    return relax.Function(func.params, new_body, func.ret_ty if hasattr(func, "ret_ty") else None,
                          func.is_pure, func.attrs)
