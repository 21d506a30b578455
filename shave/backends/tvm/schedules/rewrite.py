"""Relax rewrite: conv2d + bias [+ residual] [+ relu/clip] -> one call_tir to a scheduled kernel."""
from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from ....ir import get_op
from ..lowering import EPILOGUE_RELAX_OPS
from .conv import ConvSpec, build_primfunc, pack_weight
from .winograd import use_winograd

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


def _conv_spec(call, isa):
    """A ConvSpec for a conv2d call this rewrite can handle, else None."""
    vec = isa.fp32_lanes
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
    if groups == c and icg == 1 and oc == c:
        depthwise, groups = True, 1
    elif icg * groups == c and oc % groups == 0:
        depthwise, groups = False, _kernel_groups(c, oc, groups, vec)
    else:
        return None
    pad = tuple(int(p) for p in a.padding)
    if len(pad) == 2:
        pad = pad * 2
    spec = ConvSpec(n, c, h, wd, oc, kh, kw, tuple(int(s) for s in a.strides), pad,
                    tuple(int(d) for d in a.dilation), depthwise, None, False, vec, groups=groups,
                    regs=isa.vector_registers)
    if spec.oh < 1 or spec.ow < 1:
        return None
    return dataclasses.replace(spec, winograd=use_winograd(spec))


def _kernel_groups(c: int, oc: int, groups: int, vec: int) -> int:
    """How many groups the packed kernel runs a grouped conv as: the most (dividing
    `groups`) whose output channels fill whole vector blocks and whose input channels
    fill whole blocks or fewer than one. Groups narrower than that are merged with their
    neighbours (zero weights between them): the kernel computes up to vec/(oc/groups)
    times the conv's MACs, still far faster than TVM's unscheduled grouped conv."""
    for g in range(groups, 0, -1):
        if groups % g == 0 and (g == 1 or ((oc // g) % vec == 0 and ((c // g) % vec == 0 or c // g < vec))):
            return g
    return 1


def _merge_groups(w: np.ndarray, groups: int, kernel_groups: int) -> np.ndarray:
    """[OC, C/groups, KH, KW] -> [OC, C/kernel_groups, KH, KW]: each output channel's
    weights at its group's place inside the merged group, zeros elsewhere."""
    if groups == kernel_groups:
        return w
    oc, icg = w.shape[:2]
    m = groups // kernel_groups
    out = np.zeros((oc, icg * m) + w.shape[2:], w.dtype)
    for o in range(oc):
        p = (o // (oc // groups)) % m
        out[o, p * icg:(p + 1) * icg] = w[o]
    return out


def _folded_shift(x, var2val, consumers, uses, claimed):
    """(shift var, its input, DY, DX) when the conv input `x` is a shift (lower_float.py's
    shave_shift kernel) that nothing else reads, else None."""
    value = var2val.get(x) if isinstance(x, relax.Var) else None
    if (value is None or not _is_op(value, "relax.call_tir") or x in claimed or uses.get(x, 0) != 1
            or len(consumers.get(x, [])) != 1 or not value.args[0].name_hint.startswith("shave_shift")):
        return None
    src, dy, dx = value.args[1].fields
    if not (isinstance(dy, _Const) and isinstance(dx, _Const)):
        return None
    return x, src, dy, dx


def fuse_convs(mod: tvm.IRModule, isa, kernels: dict | None = None, tiles: dict | None = None) -> tvm.IRModule:
    """Replace every fusable conv chain in every Relax function of `mod`, with kernels sized
    for `isa` (shave.isa.ISA: vector lanes, register file).
    `kernels`, if given, is filled with {ConvSpec: GlobalVar} of the kernels made;
    `tiles` maps a ConvSpec (with tile=None) to the register tile to use instead of the default.
    Activations passed only between these kernels stay in the blocked layout."""
    kernels = {} if kernels is None else kernels
    tiles = tiles or {}
    new_funcs = {}
    bb = relax.BlockBuilder(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            chains = _find_chains(func, isa)
            if not chains:
                continue
            try:
                new = _emit(func, chains, _blocked_tails(func, chains), kernels, bb, tiles)
            except _KernelFailed:
                # a kernel could not be built: emit every layer in NCHW, skipping the ones that fail
                new = _emit(func, chains, set(), kernels, bb, tiles)
            if new is not None:
                new_funcs[gv] = new
    mod = bb.get()
    for gv, f in new_funcs.items():
        mod[gv] = f
    return mod


class _KernelFailed(Exception):
    pass


@dataclasses.dataclass
class _Chain:
    spec: ConvSpec  # layout fields not yet set
    vars: list  # bound vars of the chain, conv first; the last one is the tail
    x: relax.Expr  # the conv's input
    weight: np.ndarray
    bias: np.ndarray
    residual: relax.Var | None
    drop: list  # bindings made dead by the rewrite (reshapes of the bias)
    shift: tuple = ()  # (DY, DX) constants of a shift folded into the input packing (x is then its input)

    @property
    def tail(self):
        return self.vars[-1]


def _uses(func):
    used = []
    _collect_vars(func.body, used)
    uses: dict = {}
    for v in used:
        uses[v] = uses.get(v, 0) + 1
    return uses


def _const_scalar(expr) -> float | None:
    if isinstance(expr, _Const) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


def _hard_activation(x, var2val, consumers, uses, claimed) -> tuple[str, list] | None:
    """("hardsigmoid", bindings) for clip(x + 3, 0, 6) / 6 and ("hardswish", bindings) for
    x * (clip(x + 3, 0, 6) / 6), as lower_float.py emits them, when they are x's only uses (the last
    binding is the result); else None."""
    cs = [c for c in consumers.get(x, []) if c not in claimed]
    add = next((c for c in cs if _is_op(var2val[c], "relax.add")), None)
    mul = next((c for c in cs if _is_op(var2val[c], "relax.multiply")), None)
    if add is None or _const_scalar(var2val[add].args[1]) != 3.0 or (uses.get(x, 0), len(cs)) not in ((1, 1), (2, 2)):
        return None
    if len(cs) == 2 and mul is None:
        return None
    steps = [add]
    for op, check in (("relax.clip", lambda v: len(v.args) == 3 and (float(v.args[1].value), float(v.args[2].value))
                       == (0.0, 6.0)), ("relax.divide", lambda v: _const_scalar(v.args[1]) == 6.0)):
        nxt = consumers.get(steps[-1], [])
        if uses.get(steps[-1], 0) != 1 or len(nxt) != 1 or not _is_op(var2val[nxt[0]], op) \
                or not check(var2val[nxt[0]]):
            return None
        steps.append(nxt[0])
    if mul is None:
        return "hardsigmoid", steps
    if uses.get(steps[-1], 0) != 1 or consumers.get(steps[-1]) != [mul] \
            or not {a.same_as(x) or a.same_as(steps[-1]) for a in var2val[mul].args} == {True}:
        return None
    return "hardswish", steps + [mul]


def _find_chains(func, isa) -> list[_Chain]:
    """conv2d -> [bias add] -> [residual add] -> [an activation of conv_spec.ACTS] chains, every
    intermediate used once (hardswish: its input used by its own add and multiply only)."""
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    var2val = {}
    for blk in body.blocks:
        for bd in blk.bindings:
            if isinstance(bd, relax.VarBinding):
                var2val[bd.var] = bd.value
    uses = _uses(func)
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

    chains = []
    for blk in body.blocks:
        if not isinstance(blk, relax.DataflowBlock):
            continue
        for bd in blk.bindings:
            if not (isinstance(bd, relax.VarBinding) and _is_op(bd.value, "relax.nn.conv2d")) or bd.var in claimed:
                continue
            spec = _conv_spec(bd.value, isa)
            if spec is None:
                continue
            chain = [bd.var]
            out_shape = (spec.n, spec.oc, spec.oh, spec.ow)
            if _shape(bd.var) != out_shape:
                continue
            bias = np.zeros(spec.oc, np.float32)
            residual = None
            act = None
            drop = []
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
                            drop.append(other[0])
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
                ir_op = EPILOGUE_RELAX_OPS.get(v.op.name) if isinstance(v, relax.Call) and isinstance(
                    v.op, tvm.ir.Op) else None
                if ir_op is not None and get_op(ir_op).epilogue is not None:
                    act = get_op(ir_op).epilogue({})
                elif _is_op(v, "relax.clip") and len(v.args) == 3:
                    try:
                        lo, hi = float(v.args[1].value), float(v.args[2].value)
                        act = f"clip:{lo!r}:{hi!r}"
                    except Exception:
                        act = None
                if act is not None:
                    chain.append(nxt)
                    cur = nxt
            if act is None:
                hard = _hard_activation(cur, var2val, consumers, uses, claimed)
                if hard:
                    act, steps = hard
                    chain += steps
                    cur = steps[-1]
            spec = dataclasses.replace(spec, act=act, residual=residual is not None)
            claimed.update(chain)
            x, shift = bd.value.args[0], _folded_shift(bd.value.args[0], var2val, consumers, uses, claimed)
            if shift is not None:  # the kernel reads the shift's input; the shift binding goes
                x, spec = shift[1], dataclasses.replace(spec, shift=True, winograd=False)
                drop.append(shift[0])
                claimed.add(shift[0])
            weight = bd.value.args[1].value.numpy()
            if not spec.depthwise:
                weight = _merge_groups(weight, int(bd.value.attrs.groups), spec.groups)
            chains.append(_Chain(spec, chain, x, weight, bias, residual, drop,
                                 tuple(shift[2:]) if shift is not None else ()))
    return chains


def _blocked_tails(func, chains: list[_Chain]) -> set:
    """Tails whose every use is as the input or the residual of another chain: those
    values can be produced and consumed in the blocked layout."""
    uses = _uses(func)
    as_operand: dict = {}
    unreadable = set()  # inputs of grouped convs whose groups are narrower than a vector block
    for ch in chains:
        for v in (ch.x, ch.residual):
            if isinstance(v, relax.Var):
                as_operand[v] = as_operand.get(v, 0) + 1
        if (ch.spec.c // ch.spec.groups) % ch.spec.vec:
            unreadable.add(ch.x)
    by_tail = {ch.tail: ch for ch in chains}
    blocked = set()
    for tail, ch in by_tail.items():
        if (isinstance(tail, relax.DataflowVar) and as_operand.get(tail, 0) == uses.get(tail, 0) > 0
                and ch.spec.oc % ch.spec.vec == 0 and tail not in unreadable):
            blocked.add(tail)
    return blocked


def _emit(func, chains: list[_Chain], blocked: set, kernels, bb, tiles):
    """The function with every chain replaced by a call_tir to its kernel. With a
    non-empty `blocked`, a kernel that fails to build raises _KernelFailed."""
    replace: dict = {}  # tail var -> (new var, new value)
    drop: set = set()
    new_var = {ch.tail: relax.DataflowVar(str(ch.tail.name) + "_blocked", relax.TensorType(
        ch.spec.out_shape(blocked=True), "float32")) for ch in chains if ch.tail in blocked}
    for ch in chains:
        spec = dataclasses.replace(ch.spec, in_blocked=ch.x in blocked, out_blocked=ch.tail in blocked,
                                   res_blocked=ch.residual is not None and ch.residual in blocked)
        base = dataclasses.replace(spec, in_blocked=False, out_blocked=False, res_blocked=False)
        tile = tiles.get(spec, tiles.get(base))
        if tile is not None:
            spec = dataclasses.replace(spec, tile=tuple(tile))
        try:
            gv = kernels.get(spec)
            if gv is None:
                name = f"shave_conv{len(kernels)}"
                prim = build_primfunc(spec).with_attr("op_pattern", 8).with_attr("global_symbol", name)
                gv = bb.add_func(prim, name)
                kernels[spec] = gv
            wp = pack_weight(spec, ch.weight)
        except Exception:
            if blocked:
                raise _KernelFailed() from None
            continue
        args = [new_var.get(ch.x, ch.x), relax.const(wp), relax.const(ch.bias)]
        if ch.residual is not None:
            args.append(new_var.get(ch.residual, ch.residual))
        args += list(ch.shift)
        value = bb.normalize(relax.call_tir(gv, args, relax.TensorType(spec.out_shape(), "float32")))
        replace[ch.tail] = (new_var.get(ch.tail, ch.tail), value)
        drop.update(ch.vars[:-1])
        drop.update(ch.drop)

    if not replace:
        return None
    return rebind(func, replace, drop)


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
