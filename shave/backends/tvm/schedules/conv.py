"""Scheduled conv2d kernels: NCHW in and out, channel-blocked (NCHWc) inside.

One PrimFunc per conv layer computes

    Y = act(conv(X, W) + bias [+ residual])

in three stages:

1. `pack`: the zero-padded input, re-laid out as [N, C/v, Hp, Wp, v] (v = vector
   lanes). Channels are padded to a multiple of v with zeros.
2. `conv`: the reduction into [N, OC/v, OH, OWp, v], vectorised over the v
   output channels of a block, with a register tile of `reg_n` output columns
   times `ocb_in` channel blocks held in an accumulator that lives in registers
   (the tile is fully unrolled). The width is padded up to a multiple of reg_n,
   so any width works without predicated inner loops.
3. `out`: bias, residual and activation, written back to NCHW from the
   register tile, computed inside the tile loop (no extra pass over memory).

Weights are constants: they are packed in numpy at compile time to
[OC/v, C/v, KH, KW, v(in), v(out)] (dense; grouped: C/groups/v input blocks, those
of the output block's group) or [C/v, KH, KW, v] (depthwise), so
every weight load in the inner loop is one contiguous vector.

Between two such kernels the activation can stay blocked: with `in_blocked` the
input X is already [N, C/v, H, W, v], so `pack` is a contiguous vector copy that
only adds the zero border; with `out_blocked` the output Y (and with `res_blocked`
the residual) is [N, OC/v, OH, OW, v], stored as whole vectors straight from the
register tile. That removes the two transposes (NCHW -> NCHWc gather in `pack`,
NCHWc -> NCHW scatter in `out`) per layer, which cost as much as the reduction
itself in depthwise and short 1x1 convs. Channel counts that are not a multiple of
v (MobileNetV3's 72 and 88 on 16 lanes) round up to whole blocks: the last block's
padding lanes hold finite values that no kernel reads into a real channel (a dense
conv's reduction stops at the last real channel, `ragged_reduction`, and its packed
weights are zero there), so dense and depthwise kernels read and write
that layout as well (conv_spec.blocked_shape); grouped and Winograd kernels need
whole blocks (lane_groups.py's kernel, for groups narrower than a vector, does not).

This kernel is `Direct` in the registry of kernels.py; the module's functions
default_tile / candidate_tiles / pack_weight / compute_primfunc / default_schedule /
build_primfunc take any ConvSpec and dispatch on its `kernel` (the direct kernel's
own are the `_direct_*` functions).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .conv_spec import DENSE_TILES, ConvSpec, _padded_columns, _pick_reg_n, kernel_args, output_stage
from .kernels import ConvKernelType, kernel_of, register
from .parallel import worth_parallel


def flat_view(spec: ConvSpec) -> ConvSpec:
    """A 1x1 stride-1 unpadded conv is the same conv on a 1 x (H*W) image: its input, output
    and residual are contiguous in either layout, so the kernel computes that view and
    its register tiles run along all H*W pixels instead of one row (no padded columns at
    every row end, e.g. 7 of 8 columns used at 7x7; and tiles that divide H*W read a
    blocked input in place). Other specs are returned as they are."""
    if (spec.kh == spec.kw == 1 and spec.stride == (1, 1) and not any(spec.pad) and spec.h > 1
            and spec.kernel == "direct" and not (spec.depthwise or spec.shift)):
        return replace(spec, h=1, w=spec.h * spec.w)
    return spec


def restore_shapes(spec: ConvSpec, func):
    """`func`, a kernel computed on `flat_view(spec)`, taking and returning the tensors
    of `spec` (the flat buffers become views of them: same memory, no copy)."""
    view = flat_view(spec)
    if view is spec:
        return func
    from tvm import tirx

    shapes = {0: spec.in_shape(), len(func.params) - 1: spec.out_shape()}
    if spec.residual:
        shapes[3] = spec.out_shape(spec.res_blocked)
    params, decls = [], []
    for i, p in enumerate(func.params):
        if i in shapes:
            q = tirx.decl_buffer(shapes[i], p.dtype, name=p.name)
            decls.append(tirx.DeclBuffer(p, data=q.data))
            p = q
        params.append(p)
    return tirx.PrimFunc(params, tirx.SeqStmt(decls + [func.body]), func.ret_type, func.attrs)


# TVM's lowering (LowerTVMBuiltin) turns a CPU buffer into a stack array only when its scope
# is "global" and it has fewer than this many bytes; any other buffer is a
# TVMBackendAllocWorkspace / FreeWorkspace call pair where it is allocated, here inside the
# parallel loop. So the per-tile buffers (the accumulator, a depthwise tile's input patch)
# stay "global" and under this size.
STACK_BYTES = 1024

# dense kernels whose packed weights are at most this size order their parallel tasks pixels-major
# (_schedule): half the smallest L2 of the x86 and Arm cores targeted (512 KB on Zen 3)
PIXELS_MAJOR_MAX_WEIGHT_BYTES = 256 * 1024


# a one-row output (a flat view) is split into parallel tasks of whole tiles along it, of at most
# CHUNK_COLUMNS columns; and at least MIN_CHUNK_COLUMNS where padding the row allows (chunked_width)
CHUNK_COLUMNS = 64
MIN_CHUNK_COLUMNS = 32

# a dense kernel's task whose register tiles read more than K_BLOCK_MIN_WEIGHT_BYTES of packed
# weights (the smallest L1 of the x86 and Arm cores targeted: Zen 3's) splits its reduction into
# blocks of at most K_BLOCK_WEIGHT_BYTES of them (k_blocks), which stay in L1 beside the input
K_BLOCK_MIN_WEIGHT_BYTES = 32 * 1024
K_BLOCK_WEIGHT_BYTES = 8 * 1024

DW_MAX_REG = 8  # widest depthwise register tile (accumulators)


def _dw_cols(spec, r: int) -> int:
    """Input columns a depthwise register tile of r output columns reads."""
    return (r - 1) * spec.stride[1] + (spec.kw - 1) * spec.dilation[1] + 1


def _dw_patch_rows(spec) -> int:
    """Kernel rows of a blocked input a depthwise tile packs at once (_schedule): all kh where
    that patch (kh rows x the columns x v lanes) is a stack array for a tile of at least 2
    columns, else one row at a time (16-lane 5x5: all rows allowed 1-column tiles, 50 GFLOP/s;
    one row at a time 7-column tiles, 160-200)."""
    return spec.kh if spec.kh * _dw_cols(spec, 2) * spec.vec * 4 < STACK_BYTES else 1


def _dw_max_reg(spec) -> int:
    """Widest depthwise tile (<= DW_MAX_REG columns); a blocked input is packed per tile
    (_dw_patch_rows rows at a time), into a patch that must be a stack array."""
    if not (spec.in_blocked and not spec.shift):
        return DW_MAX_REG
    rows = _dw_patch_rows(spec)
    return max([r for r in range(1, DW_MAX_REG + 1) if rows * _dw_cols(spec, r) * spec.vec * 4 < STACK_BYTES],
               default=1)


def default_tile(spec: ConvSpec) -> tuple[int, int]:
    """(ocb_in, reg_n) of the layer's default plan (by its kernel, kernels.kernel_of)."""
    return kernel_of(spec).default_tile(spec)


def candidate_tiles(spec: ConvSpec) -> list[tuple[int, int]]:
    """Register tiles worth measuring for a layer, the default first (by its kernel)."""
    return kernel_of(spec).candidate_tiles(spec)


def pack_weight(spec: ConvSpec, w: np.ndarray) -> np.ndarray:
    """The layer's weights (OIHW; depthwise C,1,KH,KW) in the layout its kernel reads."""
    return kernel_of(spec).pack_weight(spec, w)


def build_primfunc(spec: ConvSpec):
    """The scheduled PrimFunc. Arguments: X, packed W, bias (ConvSpec.bias_len), (residual), Y."""
    return restore_shapes(spec, default_schedule(spec).mod["main"]).with_attr("tirx.is_scheduled", True)


def default_schedule(spec: ConvSpec):
    """The default schedule applied to `compute_primfunc(spec)`; its trace replays it."""
    return kernel_of(spec).default_schedule(spec)


def compute_primfunc(spec: ConvSpec):
    """The unscheduled PrimFunc (the workload a tuner schedules). Arguments as build_primfunc
    (for a direct 1x1 conv in the shapes of `flat_view(spec)`: `restore_shapes` makes them the spec's)."""
    return kernel_of(spec).compute_primfunc(spec)


def _direct_default_tile(spec: ConvSpec) -> tuple[int, int]:
    """(ocb_in, reg_n) of the direct kernel's default plan. With 16 registers (AVX2): 4 channel
    blocks x 3 columns for dense convs of 12 output blocks or more and 4 input blocks or more
    (ONNX Runtime's AVX2 conv tile; one-off A/B over 18 families, CPUID masked to AVX2 on a Zen
    5: 0.85-1.01x), else 8-12 accumulators, 2 blocks x 4-6 columns, or 3 x 3-4 where that pads
    fewer columns and leaves no empty blocks to speak of; one block x up to 12 columns where
    there are fewer than 12 output blocks and an odd number (MobileNetV3-Small 0.91 / 0.90 at
    batch 1 / 8, the same A/B). With 32 (AVX-512, NEON), where a row has
    at least 4 columns: one channel block x up to 12 columns where a zmm FMA issues once a cycle
    (Zen 4); where it issues twice (Zen 5) two blocks x up to 8 columns (three x up to 5 where
    there are three): one block's tile, a weight load and a broadcast per FMA, is load-bound
    there, and tiles of more than 16 accumulators (2 x 9-12) ran up to 2x slower. Both from the
    tile search's choices over the families on such hosts (docs/tvm-notes.md, "default register
    tile on 32 registers"); one block where two would be mostly empty ones (_few_empty_blocks);
    one block x the whole row where that reads an unpadded blocked input in place and the rules'
    width would not (_whole_row_in_place)."""
    spec = flat_view(spec)
    if spec.depthwise:
        return 1, _pick_reg_n(spec.ow, _dw_max_reg(spec))
    tile = _width_rules_tile(spec)
    if spec.ow % tile[1] and _whole_row_in_place(spec):
        return 1, spec.ow
    return tile


def _width_rules_tile(spec: ConvSpec) -> tuple[int, int]:
    """The dense default tile by the register-file rules of _direct_default_tile."""
    ocb = math.ceil(spec.oc / spec.vec)
    if spec.regs >= 32 and spec.ow >= 4:
        if spec.fma_pipes >= 2 and ocb == 3:
            return 3, _pick_reg_n(spec.ow, 5)
        if spec.fma_pipes >= 2 and _few_empty_blocks(ocb, 2):
            return 2, _pick_reg_n(spec.ow, 8)
        return 1, _pick_reg_n(spec.ow, 12)
    # 16 registers: at least 8 accumulators (an FMA's 4-cycle latency x 2 pipes) where the row
    # allows; 2 x 3 tiles (rows of 27 and 729 columns) ran 1.2-1.3x the time of 3 x 3
    if ocb == 3:  # 2 would compute a fourth, empty block
        return 3, _pick_reg_n(spec.ow, 4, 3)
    if ocb == 1 or (ocb % 2 and ocb < 12):  # 2 blocks would compute an empty one, a large share here
        return 1, _pick_reg_n(spec.ow, 12)
    if ocb >= 12 and spec.groups == 1 and spec.c >= 4 * spec.vec and _few_empty_blocks(ocb, 4):
        return 4, min(spec.ow, 3)  # 4 blocks x 3 columns, as ONNX Runtime's AVX2 conv kernels
    two = (2, _pick_reg_n(spec.ow, 6, 4))
    if spec.ow % two[1] and _few_empty_blocks(ocb, 3):  # 3 blocks where their width wastes fewer columns
        three = (3, _pick_reg_n(spec.ow, 4, 3))
        if _padded_columns(spec.ow, three[1]) < _padded_columns(spec.ow, two[1]):
            return three
    return two


def _whole_row_in_place(spec: ConvSpec) -> bool:
    """Take a tile of one block x a whole output row by default? Where the input is blocked and
    unpadded (Inception-v3's stride-2 reduction convs) a tile width that divides the row lets the
    kernel read the input in place, with no pack pass; the width rules above pick one that does
    not for rows such as 17 (2 blocks x 6 columns: 18). Mixed_6a's 288 -> 384 3x3 stride-2 conv
    (35 -> 17) took 1.18 ms with (1, 17) against 1.51 with (2, 6) on two Zen 5 threads
    (docs/tvm-notes.md, "Unpadded stride-2 convs and the tile width"). Rows of up to 3/4 of the
    vector registers (24 accumulators of 32, 12 of 16); longer rows keep the rules' tile."""
    if spec.oh == 1 or spec.groups > 1 or spec.ow > spec.regs * 3 // 4:
        return False
    return reads_input_in_place(replace(spec, tile=(1, spec.ow)))


def _few_empty_blocks(ocb: int, ocb_in: int) -> bool:
    """Whether tiles of `ocb_in` output blocks cover `ocb` blocks without much empty work: they
    divide them, or there are at least 4 tiles' worth, so the last tile's empty blocks are a
    small share (tiles of 2 on 5 or 7 blocks would compute a sixth or eighth block of zeros).
    The tile search's candidates and the two-block default both ask it."""
    return ocb_in <= ocb and (ocb % ocb_in == 0 or ocb >= 4 * ocb_in)


def _direct_candidate_tiles(spec: ConvSpec) -> list[tuple[int, int]]:
    """Register tiles of the direct kernel worth measuring for a layer (the default first):
    accumulators ocb_in x reg_n that fit the target's register file (DENSE_TILES), widths chosen
    to waste few padded columns."""
    spec = flat_view(spec)
    ocb = math.ceil(spec.oc / spec.vec)
    if spec.depthwise:
        shapes = [(1, _dw_max_reg(spec)), (1, max(2, _dw_max_reg(spec) // 2))]
    else:
        shapes = DENSE_TILES[32 if spec.regs >= 32 else 16]
    out = [_direct_default_tile(spec)]
    for ocb_in, max_reg in shapes:
        if not _few_empty_blocks(ocb, ocb_in):
            continue
        t = (ocb_in, _pick_reg_n(spec.ow, max_reg))
        if t not in out:
            out.append(t)
    return out


def reads_input_in_place(spec: ConvSpec) -> bool:
    """A blocked input that needs no copy: no padding, no shift, and every column the
    padded register tiles read exists (the tile width divides the output width)."""
    if spec.kernel != "direct":
        return False
    spec = flat_view(spec)
    p = plan(spec)
    return (spec.in_blocked and not spec.shift and not spec.depthwise and not any(spec.pad)
            and p["owp"] == spec.ow and p["vi"] == spec.vec)


def plan_tile(spec: ConvSpec, tile: tuple[int, int]) -> dict:
    """The output tiling every kernel on this module's register tiles shares: output blocks
    `ocb` rounded up to whole tiles of `ocb_in`, the width `owp` to whole tiles of `reg_n`."""
    ocb_in, reg_n = tile
    if ocb_in < 1 or reg_n < 1 or (spec.depthwise and ocb_in != 1):
        raise ValueError(f"invalid conv tile {tile}")
    ocb = math.ceil(spec.oc / spec.vec)
    return {"ocb": math.ceil(ocb / ocb_in) * ocb_in, "ocb_in": ocb_in, "reg_n": reg_n,
            "owp": math.ceil(spec.ow / reg_n) * reg_n}


def plan(spec: ConvSpec) -> dict:
    """Tiling decisions for a layer (for a 1x1 conv: on its flat view)."""
    spec = flat_view(spec)
    v = spec.vec
    p = plan_tile(spec, spec.tile or _direct_default_tile(spec))
    cg = spec.c // spec.groups
    if spec.groups > 1 and (spec.depthwise or (spec.oc // spec.groups) % v or (cg % v and cg > v)
                            or (spec.in_blocked and cg % v)):
        raise ValueError(f"grouped conv {spec.c}->{spec.oc} in {spec.groups} groups does not fit vector blocks of {v}")
    # input-channel block: v, or all channels when there are fewer (the 3-channel stem)
    # (a grouped conv: the channels of one group, so blocks never straddle two groups)
    vi = v if spec.depthwise else min(v, spec.c // spec.groups)
    if spec.oh == 1 and not spec.depthwise:
        p["owp"] = chunked_width(p)
    return {**p, "icb": math.ceil(spec.c / vi), "vi": vi,
            "icb_g": math.ceil(spec.c // spec.groups / vi), "ocb_g": spec.oc // spec.groups // v}


def _direct_pack_weight(spec: ConvSpec, w: np.ndarray) -> np.ndarray:
    """OIHW (depthwise: C,1,KH,KW) -> the blocked layout the direct kernel reads."""
    v = spec.vec
    p = plan(spec)
    if spec.depthwise:
        cb = p["ocb"]
        wp = np.zeros((cb * v, spec.kh, spec.kw), np.float32)
        wp[:spec.oc] = w[:, 0]
        return np.ascontiguousarray(wp.reshape(cb, v, spec.kh, spec.kw).transpose(0, 2, 3, 1))
    ocb, icb, vi = p["ocb"], p["icb_g"], p["vi"]  # W is [OC, C/groups, KH, KW]: its group's channels
    wp = np.zeros((ocb * v, icb * vi, spec.kh, spec.kw), np.float32)
    wp[:spec.oc, :spec.c // spec.groups] = w
    wp = wp.reshape(ocb, v, icb, vi, spec.kh, spec.kw)  # O, o, I, i, kh, kw
    return np.ascontiguousarray(wp.transpose(0, 2, 4, 5, 3, 1))  # O, I, kh, kw, i, o


def _direct_default_schedule(spec: ConvSpec):
    import tvm

    spec = flat_view(spec)
    sch = tvm.s_tir.Schedule(_direct_compute_primfunc(spec))
    _schedule(sch, spec, plan(spec))
    return sch


def pack_stage(spec: ConvSpec, X, vi: int, cb: int, owp: int, DY=None, DX=None):
    """The `pack` stage: X zero-padded as [N, cb, Hp, Wp, vi] (channel i * vi + j; channels past C
    zero), the rows and columns the conv's output rows and `owp` padded columns read; read
    through the per-channel shifts DY, DX where given. A blocked X (vi == v) is copied block by
    block; where the conv reads it in place the stage is a plain read (inlined by the schedule)."""
    from tvm import te, tirx

    c, h, w = spec.c, spec.h, spec.w
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    pt, pl = spec.pad[0], spec.pad[1]
    hp = (spec.oh - 1) * sh + dh * (spec.kh - 1) + 1
    wp = (owp - 1) * sw + dw * (spec.kw - 1) + 1
    in_place = reads_input_in_place(spec)

    def pack_fn(b, i, y, x, j):
        ch = i * vi + j
        iy, ix = y - pt, x - pl
        inside = [iy >= 0, iy < h, ix >= 0, ix < w]
        if DY is not None:  # a folded shift: read X[ch, iy - dy[ch], ix - dx[ch]]; zero outside X or in the padding
            iy, ix = iy - DY[tirx.min(ch, c - 1)], ix - DX[tirx.min(ch, c - 1)]
            inside += [iy >= 0, iy < h, ix >= 0, ix < w]
        if spec.in_blocked:  # vi == v: channels past C are the last block's padding lanes
            if in_place:  # always inside X: a plain read, so inlining it leaves no branch in the reduction
                return X[b, i, iy, ix, j]
            return tirx.if_then_else(tirx.all(*inside), X[b, i, iy, ix, j], tirx.const(0.0, "float32"))
        ok = tirx.all(ch < c, *inside)
        return tirx.if_then_else(ok, X[b, tirx.min(ch, c - 1), iy, ix], tirx.const(0.0, "float32"))

    return te.compute((spec.n, cb, hp, wp, vi), pack_fn, name="pack")


def _direct_compute_primfunc(spec: ConvSpec):
    from tvm import te, tirx

    spec = flat_view(spec)
    v = spec.vec
    p = plan(spec)
    ocb, owp, icb, vi = p["ocb"], p["owp"], p["icb"], p["vi"]
    n, c, oh, kh, kw = spec.n, spec.c, spec.oh, spec.kh, spec.kw
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    cb = ocb if spec.depthwise else icb

    w_shape = (ocb, kh, kw, v) if spec.depthwise else (ocb, p["icb_g"], kh, kw, vi, v)
    X, Wt, B, Res = kernel_args(spec, w_shape)
    args = [X, Wt, B] + ([Res] if Res is not None else [])
    DY = DX = None
    if spec.shift:
        DY, DX = te.placeholder((c,), "int32", name="DY"), te.placeholder((c,), "int32", name="DX")
        args += [DY, DX]

    P = pack_stage(spec, X, vi, cb, owp, DY, DX)
    rkh = te.reduce_axis((0, kh), name="rkh")
    rkw = te.reduce_axis((0, kw), name="rkw")
    if spec.depthwise:
        Cc = te.compute(
            (n, ocb, oh, owp, v),
            lambda b, o, y, x, j: te.sum(P[b, o, y * sh + rkh * dh, x * sw + rkw * dw, j] * Wt[o, rkh, rkw, j],
                                         axis=[rkh, rkw]), name="conv")
    else:
        if ragged_reduction(spec):  # one loop over the group's channels, not whole blocks of lanes
            rc = te.reduce_axis((0, spec.c // spec.groups), name="rc")
            rcb, rci, axes = rc // vi, rc % vi, [rc, rkh, rkw]
        else:
            rcb = te.reduce_axis((0, p["icb_g"]), name="rcb")
            rci = te.reduce_axis((0, vi), name="rci")
            axes = [rcb, rkh, rkw, rci]

        def in_block(o):  # first input block of output block o's group (padding blocks: the last group)
            if spec.groups == 1:
                return 0
            return tirx.min(o // p["ocb_g"], spec.groups - 1) * p["icb_g"]

        Cc = te.compute(
            (n, ocb, oh, owp, v),
            lambda b, o, y, x, j: te.sum(
                P[b, in_block(o) + rcb, y * sh + rkh * dh, x * sw + rkw * dw, rci] * Wt[o, rcb, rkh, rkw, rci, j],
                axis=axes), name="conv")

    return te.create_prim_func(args + [output_stage(spec, Cc, B, Res)])


def ragged_reduction(spec: ConvSpec) -> bool:
    """Does a dense conv reduce over exactly its input channels rather than whole blocks of vi? Where
    a group's channels are not a multiple of vi (ShuffleNetV2's 58 and 116, the 24 and 40 of
    MobileNetV2, MNASNet and EfficientNet on 16 lanes), whole blocks would multiply the last block's
    padding lanes by zero weights: 6 of 64 products for 58 channels, 8 of 32 for 24. Instead the
    reduction is one loop over the channels, reading channel c at block c // vi, lane c % vi (a shift
    and a mask per channel, beside the register tile's FMAs). Split into blocks and lanes again, the
    last block's lanes need a predicate or a partitioned loop, and LLVM then spilled the register tile
    (docs/tvm-notes.md, "Ragged channel reductions")."""
    return not spec.depthwise and (spec.c // spec.groups) % plan(spec)["vi"] != 0


def _tiles_per_chunk(p: dict) -> int:
    """Register tiles in one parallel chunk of a flat view's long row (at most CHUNK_COLUMNS)."""
    ntiles = p["owp"] // p["reg_n"]
    return max(d for d in range(1, ntiles + 1) if ntiles % d == 0 and d * p["reg_n"] <= CHUNK_COLUMNS)


def chunked_width(p: dict) -> int:
    """The padded width `owp` of a one-row output (a flat view) in tiles of p["reg_n"], padded
    further to whole chunks where the tiles' count has no divisor giving chunks of at least
    MIN_CHUNK_COLUMNS: Inception-v3's 17 x 17 maps are 58 tiles of 5 columns (289 + 1), chunks of
    2 tiles, so every 10-column task read all its output blocks' weights (98 KB at 768 channels) for
    two tiles; padded to 60 tiles, chunks of 12 (11 columns, 4 %, computed past the row's 289).
    Chunks of 32-64 columns, the fewest padded tiles, then the widest."""
    reg, owp = p["reg_n"], p["owp"]
    ntiles = owp // reg
    if owp <= CHUNK_COLUMNS or _tiles_per_chunk(p) * reg >= MIN_CHUNK_COLUMNS:
        return owp
    per_chunk = min(range(-(-MIN_CHUNK_COLUMNS // reg), CHUNK_COLUMNS // reg + 1),
                    key=lambda d: (-(-ntiles // d) * d, -d))
    return -(-ntiles // per_chunk) * per_chunk * reg


def _pixels_major(spec: ConvSpec, p: dict) -> bool:
    """Order a dense kernel's parallel tasks (output-channel group, row or chunk of columns)
    pixels-major? Channels-major, each group sweeps the whole input: it is read again from L3 or
    memory once per group (ResNet-50's 256 -> 64 1x1 convs: 4 times). Pixels-major, consecutive
    tasks (one thread's share) reuse the input they read, and every row or chunk reads all the
    weights: free while they stay in cache (<= PIXELS_MAJOR_MAX_WEIGHT_BYTES), else chosen
    when that traffic is the smaller (ConvNeXt's linear layers at batch 8: 25 chunks x 2.4 MB
    of weights against 96 groups x 2.4 MB of input)."""
    weight = spec.c // spec.groups * spec.kh * spec.kw * spec.oc * 4
    if weight <= PIXELS_MAJOR_MAX_WEIGHT_BYTES:
        return True
    spatial_tasks = p["owp"] // p["reg_n"] // _tiles_per_chunk(p) if spec.oh == 1 else spec.oh
    groups = p["ocb"] // p["ocb_in"]
    return spec.n * spatial_tasks * weight < groups * spec.n * spec.c * spec.h * spec.w * 4


def _schedule(sch, spec: ConvSpec, p: dict) -> None:
    reg_n, ocb_in = p["reg_n"], p["ocb_in"]
    par = worth_parallel(sch.mod["main"])
    pack = sch.get_sblock("pack")
    conv = sch.get_sblock("conv")
    out = sch.get_sblock("out")
    vector_pack = spec.in_blocked and not spec.shift  # a shift makes the read index depend on the lane
    pack_per_tile = spec.depthwise and vector_pack  # a copy, cheap to redo per tile; a gather is not
    pack_per_task = packs_per_task(spec)
    kb = 0 if spec.depthwise else k_blocks(spec, p)
    if reads_input_in_place(spec):  # the conv reads X itself: no copy of the input at all
        sch.compute_inline(pack)
    elif not (pack_per_tile or pack_per_task):
        schedule_pack_pass(sch, pack, spec, par)
    # conv
    # the accumulator stays "global": compacted to the register tile (< STACK_BYTES) it is a
    # stack array that LLVM keeps in registers; "local" made it a workspace call per row or tile
    loops = sch.get_loops(conv)
    if spec.depthwise:
        b, o, y, x, j, rkh, rkw = loops
        xo, xi = sch.split(x, [None, reg_n])
        sch.reorder(b, o, y, xo, rkh, rkw, xi, j)
        outer = sch.fuse(b, o, y)
        first_r = rkh
        unrolled = [xi]
        if pack_per_tile:
            # the input patch one register tile reads (its kh rows, or one kernel row at a time:
            # _dw_patch_rows), packed inside the tile loop: a stack array in L1 instead of a whole
            # padded copy of the input going out to L2/L3 and back (and small enough not to be a
            # workspace call per tile)
            sch.compute_at(pack, xo if _dw_patch_rows(spec) == spec.kh else rkh)
            sch.vectorize(sch.get_loops(pack)[-1])
    else:
        b, o, y, x, j, *reduction = loops  # rcb, rkh, rkw, rci; or rc, rkh, rkw (ragged_reduction)
        oo, oi = sch.split(o, [None, ocb_in])
        xo, xi = sch.split(x, [None, reg_n])
        sch.reorder(b, oo, y, xo, *reduction, oi, xi, j)
        outer, xo = parallel_tasks(sch, spec, p, b, oo, y, xo)
        if pack_per_task:
            pack_in_task(sch, pack, outer)
        first_r = reduction[0]
        unrolled = [oi, xi]
        if kb:  # the task's reduction in blocks of kb input blocks, each over all its tiles
            rko, rki = sch.split(first_r, [None, kb])
            sch.reorder(rko, xo)
            first_r, xo = rko, outer  # zeroed before and finished after all its blocks
    if par:
        sch.parallel(outer)
    sch.vectorize(j)
    for lp in unrolled:
        sch.unroll(lp)
    sch.reverse_compute_at(out, xo)
    init = sch.decompose_reduction(conv, first_r)
    if kb:
        schedule_task_ends(sch, init, out, spec)
    else:
        schedule_tile_ends(sch, init, out, spec, len(unrolled))


def tiles_per_task(spec: ConvSpec, p: dict) -> int:
    """Register tiles in one parallel task of a dense kernel (parallel_tasks): a chunk of a flat
    view's row, else one output row."""
    return _tiles_per_chunk(p) if spec.oh == 1 else p["owp"] // p["reg_n"]


def k_blocks(spec: ConvSpec, p: dict) -> int:
    """Input-channel blocks per reduction block of a dense kernel's task, or 0: one reduction over
    all of them per register tile. A tile reads the weights of its output blocks for the whole
    reduction; where those are more than K_BLOCK_MIN_WEIGHT_BYTES (a 1024-channel 1x1 conv's two
    output blocks: 128 KB) every tile of the task streams them from L2 again. In blocks, each
    block's weights (K_BLOCK_WEIGHT_BYTES) are read from L2 once and stay in L1 for all the
    task's tiles, and a tile's accumulators go through the task's buffer between blocks (a load
    and a store per block of 64+ multiply-adds per accumulator). ONNX Runtime's NCHWc pointwise
    kernel does the same in batches of 128 channels. The block: the most whole input blocks
    within the budget that divide the reduction (no partial last block); none where the task has
    one tile (nothing to reuse), the reduction is ragged (one loop over channels) or one input
    block's weights are past the budget (a 3x3 or 5x5 conv's taps on 16 lanes: AlexNet's 5x5
    64 -> 192 conv took 1.02-1.07x the time in blocks of one input block).
    One kernel alone, blocked in and out, two threads, interleaved (Intel Xeon, AVX-512 and
    AVX2 code): ResNet-50's 2048 -> 512 1x1 conv 0.91x the time, 1024 -> 256 0.92-0.95x,
    512 -> 2048 0.95x (AVX2 1.00x, 0.91x at 2048 -> 512); blocking a 32 KB reduction (256 ->
    1024) instead took 1.04-1.08x, and blocks of 16 channels 1.17-1.26x (docs/tvm-notes.md,
    "Reduction blocks")."""
    if spec.depthwise or ragged_reduction(spec) or tiles_per_task(spec, p) < 2:
        return 0
    per_block = p["ocb_in"] * spec.vec * p["vi"] * spec.kh * spec.kw * 4
    icb = p["icb_g"]
    if icb < 2 or icb * per_block <= K_BLOCK_MIN_WEIGHT_BYTES or per_block > K_BLOCK_WEIGHT_BYTES:
        return 0
    return max(d for d in range(1, icb) if icb % d == 0 and d * per_block <= K_BLOCK_WEIGHT_BYTES)


def packs_per_task(spec: ConvSpec) -> bool:
    """Does a strided grouped conv's parallel task (an output row of a group tile) pack the input
    rows it reads, inside the task? Where the input is blocked and not shifted (a copy of whole
    vectors, not a gather). At stride 2 the input has 4x the output's pixels, and a grouped conv's
    few channels give too little work per input byte to pay for a whole padded copy of it going out
    to L3 and back: RegNetX-400MF's and ResNeXt-50's stride-2 grouped convs ran at half the speed
    of their stride-1 ones, and packed per task 1.1-1.7x faster. At stride 1 a task packs each input
    row three times (once per output row that reads it), and ResNeXt-50's stride-1 grouped convs
    took 7-13 % longer so. A register tile's patch, as depthwise convs pack, would be a workspace
    call per tile (16 lanes x 3 rows x 17 columns > STACK_BYTES); one per task is amortised over
    the row's tiles."""
    return (spec.groups > 1 and not spec.depthwise and spec.in_blocked and not spec.shift
            and max(spec.stride) > 1 and not reads_input_in_place(spec))


def pack_in_task(sch, pack, outer) -> None:
    """The pack stage inside the parallel task loop `outer` (packs_per_task), its lanes vectorised."""
    sch.compute_at(pack, outer)
    sch.vectorize(sch.get_loops(pack)[-1])


def schedule_pack_pass(sch, pack, spec: ConvSpec, par: bool) -> None:
    """The pack stage as one pass over the input: parallel over (n, channel block, row) where the
    kernel is, vectorised over a block's lanes where the input is blocked and not shifted (a
    shift makes the read index depend on the lane)."""
    b, i, y, x, j = sch.get_loops(pack)
    if par:
        sch.parallel(sch.fuse(b, i, y))
    if spec.in_blocked and not spec.shift:
        sch.vectorize(j)


def parallel_tasks(sch, spec: ConvSpec, p: dict, b, oo, y, xo):
    """(the fused loop of a dense kernel's parallel tasks, the register-tile loop): images, output
    rows and output-channel groups `oo`, ordered pixels-major or channels-major (_pixels_major);
    on a one-row output (a flat view) chunks of tiles along the row instead of rows."""
    pixels_major = _pixels_major(spec, p)
    if spec.oh == 1:  # a flat view (one long row): chunks of tiles along it are the parallel work
        xc, xo = sch.split(xo, [None, _tiles_per_chunk(p)])
        if pixels_major:
            sch.reorder(b, y, xc, oo)
        return (sch.fuse(b, y, xc, oo) if pixels_major else sch.fuse(b, oo, y, xc)), xo
    if pixels_major:
        sch.reorder(b, y, oo)
    return (sch.fuse(b, y, oo) if pixels_major else sch.fuse(b, oo, y)), xo


def schedule_task_ends(sch, init, out, spec: ConvSpec) -> None:
    """The accumulator's zeroing and the output stage of a kernel in reduction blocks (k_blocks):
    each once per task, before and after its blocks, over the task's (channel blocks,) columns
    and lanes, the lanes vectorised; the zeroing's register tile (its loops between the task's
    tile loop and the lanes) unrolled."""
    loops = sch.get_loops(init)  # the task, its tiles, (the tile's channel blocks,) columns, lanes
    sch.vectorize(loops[-1])
    for lp in loops[2:-1]:
        sch.unroll(lp)
    loops = sch.get_loops(out)
    if spec.out_blocked:
        sch.vectorize(loops[-1])


def schedule_tile_ends(sch, init, out, spec: ConvSpec, tile_loops: int) -> None:
    """The accumulator's zeroing (`init`, from decompose_reduction) and the output stage `out`, both
    under the register-tile loop: the lanes vectorised, the tile's `tile_loops` loops (channel
    blocks, columns) unrolled; an NCHW output's scatter unrolled over its last two loops."""
    loops = sch.get_loops(init)
    sch.vectorize(loops[-1])
    for lp in loops[-1 - tile_loops:-1]:
        sch.unroll(lp)
    # the output stage's own loops, under the register-tile loop: (channel blocks of the tile,)
    # columns, lanes; a tile of one channel block has no loop for it (reverse_compute_at makes
    # none of extent 1), so they are counted from the tile loop's depth, not from the end
    depth = len(loops) - tile_loops - 1
    loops = sch.get_loops(out)[depth:]
    if spec.out_blocked:
        sch.vectorize(loops[-1])
        for lp in loops[:-1]:
            sch.unroll(lp)
    else:
        for lp in loops[-2:]:
            sch.unroll(lp)


@register
class Direct(ConvKernelType):
    """The direct kernel (this module): dense, grouped (groups filling vector blocks; fusion
    merges narrower ones the lane-groups kernel does not take) and depthwise convs of any
    kernel size, stride, dilation and padding, with an input shift folded in; blocked values
    with padded last blocks in and out (not for grouped convs)."""

    name, priority = "direct", 0
    default_tile = staticmethod(_direct_default_tile)
    candidate_tiles = staticmethod(_direct_candidate_tiles)
    pack_weight = staticmethod(_direct_pack_weight)
    compute_primfunc = staticmethod(_direct_compute_primfunc)
    default_schedule = staticmethod(_direct_default_schedule)

    def supports(self, spec) -> bool:
        return True

    def ragged(self, spec) -> bool:
        return spec.groups == 1
