"""IR ops of the compact building blocks the rewrite passes produce: `shift` and `channel_shuffle`.

shift(x, shifts): a per-channel spatial shift with zero fill (ShiftNet). `shifts`
holds one (dy, dx) per channel of x, and

    out[n, c, h, w] = x[n, c, h - dy_c, w - dx_c]   (0 where that falls outside x)

so a positive dy moves the content down. No arithmetic (0 FLOPs); its channels
pass straight through, each keeping its own shift when pruning removes others.

channel_shuffle(x, groups): ShuffleNet's shuffle, x viewed as [N, g, C/g, ...],
the two channel axes swapped, viewed back: out[:, j] = x[:, (j % g) * (C/g) + j // g].
It is the channel_permute with those indices, kept as its own op so the graph
says what it is; pruning (which can break the C % g structure) turns it into
that channel_permute.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IRError
from . import channels as ch
from .ops import register_op


def _check_shift(ins, attrs):
    x, shifts = ins[0], attrs["shifts"]
    if x.ndim != 4:
        raise IRError(f"shift wants a 4-d NCHW input, got {x}")
    if len(shifts) != x.shape[1]:
        raise IRError(f"shift has {len(shifts)} (dy, dx) pairs for the {x.shape[1]} channels of {x}")
    for c, s in enumerate(shifts):
        if len(s) != 2 or not all(isinstance(v, (int, np.integer)) for v in s):
            raise IRError(f"shift of channel {c} must be a pair of ints (dy, dx), got {s!r}")


def shift(x, *, shifts):
    """Torch reference: one padded slice per distinct shift, then the channels back in order."""
    h, w = x.shape[2], x.shape[3]
    pad = max(max(abs(int(dy)), abs(int(dx))) for dy, dx in shifts)
    xp = F.pad(x, (pad, pad, pad, pad))
    by_shift: dict = {}
    for c, (dy, dx) in enumerate(shifts):
        by_shift.setdefault((int(dy), int(dx)), []).append(c)
    parts, order = [], []
    for (dy, dx), chans in by_shift.items():
        parts.append(xp[:, chans, pad - dy:pad - dy + h, pad - dx:pad - dx + w])
        order += chans
    out = torch.cat(parts, 1)
    return out if order == list(range(len(order))) else out[:, np.argsort(order).tolist()]


def shuffle_indices(channels: int, groups: int) -> tuple[int, ...]:
    """out[:, j] = x[:, indices[j]] for channel_shuffle(groups)."""
    return tuple(int(i) for i in np.arange(channels).reshape(groups, channels // groups).T.reshape(-1))


def _check_shuffle(ins, attrs):
    x, g = ins[0], attrs["groups"]
    if x.ndim < 2:
        raise IRError(f"channel_shuffle wants an input with a channel axis, got {x}")
    if not isinstance(g, (int, np.integer)) or g < 1 or x.shape[1] % g:
        raise IRError(f"channel_shuffle groups={g!r} must be a positive divisor of the {x.shape[1]} channels of {x}")


def channel_shuffle(x, *, groups):
    n, c = x.shape[0], x.shape[1]
    return x.reshape(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def _shuffle_rule(in_types, out, attrs):
    return ch.channel_permute(in_types, out, {"indices": shuffle_indices(out.shape[1], attrs["groups"])})


register_op("shift", shift, check=_check_shift, attrs=("shifts",), channels=ch.elementwise,
            role="movement")
register_op("channel_shuffle", channel_shuffle, check=_check_shuffle, attrs=("groups",), channels=_shuffle_rule,
            role="movement")
