"""IR ops that resize, pad and rearrange feature maps, and the max/min reductions.

resize(x, size, mode, align_corners, scales): nearest or bilinear upsampling/downsampling of
    the last two axes to `size` (FPN and U-Net decoders, segmentation heads, YOLO necks).
    `scales` is the scale factor the model gave (None when it gave a size): PyTorch maps output
    pixels through 1/scale, not in/out, so the reference calls interpolate the same way.
pad(x, pads, mode, value): F.pad's `pads` (last axis first, before/after pairs), mode
    "constant" (ZeroPad2d, ConstantPad2d, TF-style "same" padding), "reflect" or "replicate".
pixel_shuffle(x, upscale): [N, C*r*r, H, W] -> [N, C, H*r, W*r] (super-resolution).
amax / amin(x, axes, keepdim): max / min over axes.

Channels: resize keeps batch and channel axes; pad keeps every axis it does not pad (a padded
channel axis is frozen); pixel_shuffle ties each output channel to its r*r input channels;
amax / amin as mean.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import IRError
from . import channels as ch
from .ops import register_op

RESIZE_MODES = ("nearest", "bilinear")
PAD_MODES = ("constant", "reflect", "replicate")


def _numel(t) -> int:
    return math.prod(t.shape)


def _check_resize(ins, attrs):
    x = ins[0]
    if x.ndim != 4:
        raise IRError(f"resize wants a 4-d NCHW input, got {x}")
    if attrs["mode"] not in RESIZE_MODES:
        raise IRError(f"resize mode must be one of {RESIZE_MODES}, got {attrs['mode']!r}")
    if len(attrs["size"]) != 2 or min(attrs["size"]) < 1:
        raise IRError(f"resize size must be two positive sizes, got {attrs['size']!r}")


def resize(x, *, size, mode, align_corners, scales):
    corners = align_corners if mode == "bilinear" else None
    if scales is not None:
        return F.interpolate(x, scale_factor=tuple(scales), mode=mode, align_corners=corners)
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=corners)


register_op("resize", resize, check=_check_resize, attrs=("size", "mode", "align_corners", "scales"),
            flops=lambda ins, out, a: _numel(out) * (7 if a["mode"] == "bilinear" else 0),
            channels=ch.leading(2), role="movement")


def _check_pad(ins, attrs):
    x, pads = ins[0], attrs["pads"]
    if len(pads) % 2 or len(pads) // 2 > x.ndim:
        raise IRError(f"pad wants before/after pairs for at most {x.ndim} axes, got {pads!r}")
    if attrs["mode"] not in PAD_MODES:
        raise IRError(f"pad mode must be one of {PAD_MODES}, got {attrs['mode']!r}")
    if attrs["mode"] != "constant" and min(pads) < 0:
        raise IRError(f"{attrs['mode']} pad cannot crop (negative pads {pads!r})")


def pad(x, *, pads, mode, value):
    return F.pad(x, list(pads), mode=mode, value=value if mode == "constant" else None)


def padded_axes(ndim: int, pads) -> set[int]:
    """The axes `pads` (F.pad order: last axis first) changes."""
    return {ndim - 1 - i // 2 for i, p in enumerate(pads) if p}


def _pad_rule(in_types, out, attrs):
    r = ch.ChannelRule()
    padded = padded_axes(out.ndim, attrs["pads"])
    for axis in range(out.ndim):
        if axis in padded:
            r.frozen += [(0, axis), (ch.OUT, axis)]
        else:
            r.same((0, axis), (ch.OUT, axis), out.shape[axis])
    return r


register_op("pad", pad, check=_check_pad, attrs=("pads", "mode", "value"), channels=_pad_rule,
            role="movement")


def _check_pixel_shuffle(ins, attrs):
    x, r = ins[0], attrs["upscale"]
    if x.ndim != 4 or not isinstance(r, int) or r < 1 or x.shape[1] % (r * r):
        raise IRError(f"pixel_shuffle({r!r}) wants a 4-d input whose channels divide by {r!r}^2, got {x}")


def _pixel_shuffle_rule(in_types, out, attrs):
    rr = attrs["upscale"] ** 2
    c = out.shape[1]
    r = ch.ChannelRule()
    r.same((0, 0), (ch.OUT, 0), out.shape[0])
    r.pairs((0, 1), (ch.OUT, 1), list(range(c * rr)), [i // rr for i in range(c * rr)])
    return r


register_op("pixel_shuffle", lambda x, *, upscale: F.pixel_shuffle(x, upscale), check=_check_pixel_shuffle,
            attrs=("upscale",), channels=_pixel_shuffle_rule, role="movement")

for _name, _fn in (("amax", torch.amax), ("amin", torch.amin)):
    register_op(_name, lambda x, *, axes, keepdim, fn=_fn: fn(x, list(axes), keepdim),
                flops=lambda ins, out, a: _numel(ins[0]), attrs=("axes", "keepdim"), channels=ch.mean,
                role="reduction")
