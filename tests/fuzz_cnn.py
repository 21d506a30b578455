"""Random small CNNs for the fuzz tests: a hypothesis strategy over a plain description (so examples
shrink to a readable minimal case) and the nn.Module it describes.

A description is (batch, channels, height, width, blocks, head). Each block maps a feature map to a
feature map; kinds: conv (1x1/3x3/5x5, stride 1-2, dilation 1-2, dense / grouped / depthwise, with
or without bias), bn, act (every activation the IR has), residual (conv-bn-act added to its input),
concat (two conv branches), split (chunk, a conv on one half, concat back), shuffle, se
(squeeze-excitation gate), pool (max/avg, 2x2 or 3x3), upsample (nearest/bilinear), pad (constant /
reflect / replicate), convt (transposed conv). Heads: the feature map, global pool + linear, or both
(two outputs).
"""
from __future__ import annotations

import zlib

import torch
from hypothesis import strategies as st
from torch import nn
import torch.nn.functional as F

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "leaky": lambda: nn.LeakyReLU(0.1), "hardswish": nn.Hardswish,
        "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU,
        "hardsigmoid": nn.Hardsigmoid, "clamp": lambda: nn.Hardtanh(-0.5, 1.5)}
KINDS = ("conv", "bn", "act", "residual", "concat", "split", "shuffle", "se", "pool", "upsample", "pad", "convt")


@st.composite
def cnn_descriptions(draw, max_blocks: int = 5):
    c = draw(st.integers(1, 8))
    h, w = draw(st.integers(6, 14)), draw(st.integers(6, 14))
    blocks = []
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(KINDS))
        blocks.append((kind, draw(st.integers(0, 2 ** 16))))  # the block's own choices come from its seed
    head = draw(st.sampled_from(["map", "linear", "both"]))
    return draw(st.sampled_from([1, 2])), c, h, w, tuple(blocks), head


def _choice(g: torch.Generator, options):
    return options[int(torch.randint(len(options), (1,), generator=g))]


class _Block(nn.Module):
    def __init__(self, kind: str, seed: int, c: int, h: int, w: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind, self.out_c, self.out_hw = kind, c, (h, w)
        if kind == "conv":
            k = _choice(g, [1, 3, 5] if min(h, w) >= 5 else [1, 3])
            s = _choice(g, [1, 1, 2]) if min(h, w) >= 8 else 1
            d = _choice(g, [1, 1, 2]) if k == 3 and min(h, w) >= 7 else 1
            groups = _choice(g, ["dense", "dense", "dw", "grouped"])
            oc = c if groups == "dw" else int(torch.randint(1, 17, (1,), generator=g))
            gr = c if groups == "dw" else 1
            if groups == "grouped":
                gr = next((q for q in (4, 3, 2) if c % q == 0), 1)
                oc = gr * max(1, oc // gr)
            self.op = nn.Conv2d(c, oc, k, s, d * (k // 2), d, gr, bias=_choice(g, [True, False]))
            self.out_c = oc
            self.out_hw = tuple((n + 2 * d * (k // 2) - d * (k - 1) - 1) // s + 1 for n in (h, w))
        elif kind == "bn":
            self.op = nn.BatchNorm2d(c)
            self.op.running_mean.uniform_(-1, 1, generator=g)
            self.op.running_var.uniform_(0.5, 2, generator=g)
            self.op.weight.data.uniform_(0.5, 1.5, generator=g)
        elif kind == "act":
            self.op = ACTS[_choice(g, sorted(ACTS))]()
        elif kind == "residual":
            self.op = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        elif kind == "concat":
            a, b = (int(torch.randint(1, 9, (1,), generator=g)) for _ in range(2))
            self.op = nn.ModuleList([nn.Conv2d(c, a, 1), nn.Conv2d(c, b, 3, padding=1)])
            self.out_c = a + b
        elif kind == "split":
            self.half = c // 2
            self.op = nn.Conv2d(self.half, self.half, 3, padding=1) if self.half else nn.Identity()
        elif kind == "shuffle":
            self.groups = next((q for q in (4, 2) if c % q == 0 and c > q), 1)
            self.op = nn.ChannelShuffle(self.groups) if self.groups > 1 else nn.Identity()
        elif kind == "se":
            r = max(1, c // 4)
            self.op = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, r, 1), nn.ReLU(), nn.Conv2d(r, c, 1),
                                    nn.Sigmoid())
        elif kind == "pool":
            k = _choice(g, [2, 3])
            if min(h, w) < 2 * k:
                self.op = nn.Identity()
            else:
                self.op = (nn.MaxPool2d if _choice(g, [True, False]) else nn.AvgPool2d)(k, 2, k // 2 if k == 3 else 0)
                self.out_hw = tuple((n + 2 * (k // 2 if k == 3 else 0) - k) // 2 + 1 for n in (h, w))
        elif kind == "upsample":
            mode = _choice(g, ["nearest", "bilinear"])
            self.op = nn.Upsample(scale_factor=2, mode=mode, align_corners=False if mode == "bilinear" else None)
            self.out_hw = (2 * h, 2 * w) if max(h, w) <= 16 else (h, w)
            if max(h, w) > 16:
                self.op = nn.Identity()
        elif kind == "pad":
            mode = _choice(g, ["constant", "reflect", "replicate"])
            p = (1, 0, 1, 2)
            self.op = {"constant": nn.ZeroPad2d(p), "reflect": nn.ReflectionPad2d(p),
                       "replicate": nn.ReplicationPad2d(p)}[mode]
            self.out_hw = (h + 3, w + 1)
        elif kind == "convt":
            oc = int(torch.randint(1, 9, (1,), generator=g))
            self.op = nn.ConvTranspose2d(c, oc, 2, 2)
            self.out_c, self.out_hw = oc, (2 * h, 2 * w)
            if max(h, w) > 16:
                self.op, self.out_c, self.out_hw = nn.Identity(), c, (h, w)

    def forward(self, x):
        if self.kind == "residual":
            return x + self.op(x)
        if self.kind == "concat":
            return torch.cat([m(x) for m in self.op], 1)
        if self.kind == "split":
            if not self.half:
                return x
            a, b = x[:, :self.half], x[:, self.half:]
            return torch.cat([self.op(a), b], 1)
        if self.kind == "se":
            return x * self.op(x)
        return self.op(x)


class FuzzCNN(nn.Module):
    def __init__(self, description):
        super().__init__()
        _, c, h, w, blocks, head = description
        layers = []
        for kind, seed in blocks:
            b = _Block(kind, seed, c, h, w)
            layers.append(b)
            c, (h, w) = b.out_c, b.out_hw
        self.blocks = nn.Sequential(*layers)
        self.head = head
        self.fc = nn.Linear(c, 5) if head != "map" else None

    def forward(self, x):
        y = self.blocks(x)
        if self.head == "map":
            return y
        logits = self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))
        return logits if self.head == "linear" else (logits, y)


def build(description):
    """(eval-mode model, example input) for a description, the same in every process."""
    n, c, h, w, _, _ = description
    seed = zlib.crc32(repr(description).encode())
    torch.manual_seed(seed)  # the weights' default initialisation
    model = FuzzCNN(description).eval()
    return model, torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))
