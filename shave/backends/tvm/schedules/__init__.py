"""Default (untuned) CPU schedules for the Relax module shave builds.

TVM 0.27's CPU pipeline leaves every operator as naive, single-threaded loops,
so shave makes its own kernels and schedules; the module reaching `tvm.compile`
has every PrimFunc scheduled (and marked opaque, so the pipeline's own fusion
leaves them alone):

1. Convolutions (`conv.py`), made during lowering. Each float `conv2d` with
   constant weights, with its bias, optional residual add and optional
   activation (relu, clip/relu6, sigmoid, SiLU, hardswish, hardsigmoid: the ops
   with an `epilogue` trait, conv_spec.ACTS; every intermediate used once), is
   planned on the IR by `fusion.py` and emitted by `lower.py` as one `call_tir`
   to a PrimFunc built and scheduled here. Dense convs, grouped convs whose groups hold whole vector
   blocks of output channels (and whole blocks, or fewer than one, of input
   channels; narrower groups are merged with zero weights between them, or, where
   that would more than double the work, run on half-width vectors with NCHW in and
   out: `fusion.grouped_lanes`), and depthwise convs (groups=C=OC) are handled; other grouped
   convs, non-NCHW or non-float32 convs keep TVM's default lowering.

   Layout: the graph stays NCHW; each kernel packs its input to NCHWc (v =
   vector lanes of the target: 8 for AVX2, 16 for AVX-512, 4 for NEON/SSE)
   and vectorises over a block of v output channels, with weights pre-packed
   at compile time to OIHW{v}i{v}o. Measured reasons: vectorising over W
   (plain NCHW) wastes lanes at 7x7/14x14 and needs strided loads for stride 2;
   vectorising over output channels does not depend on the spatial size, the
   weight loads are contiguous vectors and the input values are broadcasts.
   The per-layer repacking is one pass over the input (cheap next to the
   reduction, which reads it C_out*K*K/v times) and the unpacking back to NCHW
   happens on the register tile inside the epilogue, so no extra pass over
   the output. Between two conv kernels (a value read only by conv kernels,
   as input or residual, with whole channel blocks) the activation stays
   NCHWc and both transposes disappear (a conv without padding whose register
   tiles divide the width reads such an input in place, no copy at all); any
   other reader gets NCHW.

   Register tile: `reg_n` output columns x `ocb_in` channel blocks
   (2 x 4..6 for dense, 3 x 4 when there are 3 blocks, 1 x 8 for depthwise:
   8-12 of the 16 ymm registers as accumulators; with 32 registers, dense
   1 x up to 12 where a row has 4 or more columns), fully unrolled, the output
   width padded to a multiple of reg_n inside the kernel so odd widths keep
   the same inner loop. The outer (batch, channel block, output row) loops are
   fused and run in parallel. A 1x1 stride-1 unpadded conv is computed on its
   flat 1 x H*W view (`conv.flat_view`; the tensors are contiguous either way,
   and the kernel's buffers are views of the spec's shapes): its tiles run
   along all pixels, so a 7x7 map has no padded column per row, and chunks of
   tiles are the parallel work.

   Kernel rows/columns that read only zero padding at every output position
   are dropped before planning (`fusion._trim_padding_taps`; exact): a dilated
   conv on a map smaller than its dilation, like DeepLabV3's ASPP rates 24 and
   36 on a 14x14 map, is computed as the 1x1 conv it is.

   Dense 3x3 convs with stride 1 and dilation 1 and at least 32 input and output
   channels run as Winograd F(2x2, 3x3) instead (`winograd.py`: 2.25x fewer
   multiplies; same spec, layouts and fused epilogue, so they sit in the same
   blocked chains).

   Int8 convs (qconv2d) come from the lowering as marked call_tir kernels
   (`int8.py`: u8 x s8 -> i32 with vpmaddubsw/vpmaddwd on AVX2, fused requantization),
   scheduled by `schedule_module(mod, target)`, which runs before `tvm.compile`.

   Attention (q @ k^T with its scale, softmax, probabilities @ v) is three of
   `matmul.py`'s kernels on CPU targets, emitted by the attention lowering: both
   matmul operands packed inside (B as [N/v, K, v] vector columns, A's rows padded
   to the register tile), rows x cols-vector register tiles around the k loop; the
   scores' rows padded to whole vectors so the softmax (vector partial max and sum,
   vector exp) has no tail.

2. Every other operator: TVM's legalization, FoldConstant and FuseOps /
   FuseTIR, then a generic rule (`generic.py`): for each block, the outer
   spatial loops are fused and run in parallel, and the innermost spatial
   loop of a pure elementwise block is vectorised when its extent allows.
   Linear layers with constant weights are planned (`fusion.py`) as 1x1 convs
   with the batch along the width (an N-d input x[..., K], e.g. ConvNeXt's
   channels-last blocks, as its [prod(...), K] view), so they get the conv kernel, its
   packed weights and its fused bias and activation (measured reason: TVM's
   legalized matmul runs serially over the output with a strided weight read;
   MobileNetV2's 1280x1000 classifier took 2.0 ms of a 9 ms model that way).

Anything a rule cannot handle keeps its default (correct, slow) code: each
rule is applied on a copy and dropped if scheduling raises.
"""
from __future__ import annotations

import tvm

from .generic import schedule_generic
from .gpu import schedule_gpu
from .int8 import schedule_qconvs
from .int8_blocked import block_qconvs
from .legalize import legalize_and_fuse
from ....isa import isa

__all__ = ["schedule_module"]


def schedule_module(mod: tvm.IRModule, target: dict) -> tvm.IRModule:
    """The Relax module (lower.to_relax for `target`: its float conv kernels already made)
    with the int8 kernels and all other operators scheduled for `target`."""
    if target.get("kind") == "cuda":
        return schedule_gpu(mod, target)
    if target.get("kind") != "llvm":
        return mod
    desc = isa(target)
    tgt = tvm.target.Target(target)
    with tgt:
        mod = schedule_qconvs(block_qconvs(mod), target)  # int8 conv kernels (int8.py), before anything fuses them
        mod = legalize_and_fuse(mod)
        mod = schedule_generic(mod, desc.fp32_lanes)
    return mod
