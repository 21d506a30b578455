"""Upsampling, padding, pixel shuffle, leaky_relu, amax/amin, repeat, expand, attention: captured, compiled and pruned like the rest."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shave
from conftest import rel_err
from shave.reference import run_graph
from shave.passes import Prune
from shave.passes.prune import remove_channels
from test_prune import zero_consumers

CASES = {
    "nearest_x2": lambda y: F.interpolate(y, scale_factor=2, mode="nearest"),
    "nearest_size": lambda y: F.interpolate(y, size=(11, 7), mode="nearest"),
    "bilinear_size": lambda y: F.interpolate(y, size=(7, 9), mode="bilinear", align_corners=False),
    "bilinear_corners": nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    "bilinear_down": lambda y: F.interpolate(y, size=(3, 4), mode="bilinear"),
    "zero_pad": nn.ZeroPad2d((0, 1, 0, 1)),
    "constant_pad": nn.ConstantPad2d((1, 2, 3, 0), 0.5),
    "crop_pad": lambda y: F.pad(y, (-1, 1, 0, -2)),
    "reflect_pad": nn.ReflectionPad2d(2),
    "replicate_pad": nn.ReplicationPad2d((1, 1, 2, 2)),
    "leaky_relu": nn.LeakyReLU(0.1),
    "amax": lambda y: torch.amax(y, (2, 3)),
    "amin_keepdim": lambda y: torch.amin(y, 1, keepdim=True),
    "pixel_shuffle": nn.PixelShuffle(2),
    "repeat": lambda y: y.repeat(1, 1, 2, 3),
}


class Around(nn.Module):
    """conv -> the op -> conv (where the shape allows), so the op sits between two pruned layers."""

    def __init__(self, op, after: bool):
        super().__init__()
        self.a, self.op = nn.Conv2d(3, 16, 3, padding=1), op
        self.b = nn.Conv2d(4 if isinstance(op, nn.PixelShuffle) else 16, 8, 3, padding=1) if after else None

    def forward(self, x):
        y = self.op(torch.relu(self.a(x)))
        return self.b(y) if self.b is not None else y


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_compiles_and_matches_eager(name):
    torch.manual_seed(0)
    op = CASES[name]
    model = Around(op if isinstance(op, nn.Module) else _Fn(op), after=not name.startswith("am")).eval()
    x = torch.randn(2, 3, 9, 10)
    cm = shave.compile(model, (x,))
    with torch.no_grad():
        ref = model(x).numpy()
    assert rel_err(cm(x.numpy()), ref) <= 1e-5
    assert cm.report.rows[-1].error <= 1e-5


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, y):
        return self.fn(y)


@pytest.mark.parametrize("name", ["nearest_x2", "bilinear_size", "reflect_pad", "leaky_relu", "pixel_shuffle"])
def test_pruning_through_the_op_is_exact_when_the_pruned_channels_are_zero(name):
    """Prune the first conv by half: its channels travel through the op (pixel shuffle: in groups of
    4) into the second conv; with those filters zeroed first, the pruned graph changes nothing."""
    torch.manual_seed(0)
    op = CASES[name]
    model = Around(op if isinstance(op, nn.Module) else _Fn(op), after=True).eval()
    x = torch.randn(1, 3, 9, 10)
    g = shave.capture(model, (x,))
    units = Prune(ratio=0.5, round_to=1).select(g)
    zeroed = zero_consumers(g, units)
    pruned = remove_channels(zeroed.copy(), units)
    kept = pruned.params[pruned.nodes[0].inputs[1]].shape[0]
    assert kept == 8 if name != "pixel_shuffle" else kept % 4 == 0 and 4 <= kept < 16
    xn = x.numpy()
    assert rel_err(run_graph(pruned, [xn])[0], run_graph(zeroed, [xn])[0]) <= 1e-5
    cm = shave.compile(pruned, (x,))  # and it compiles to its own numbers
    np.testing.assert_allclose(cm(xn), run_graph(pruned, [xn])[0], rtol=1e-4, atol=1e-5)


def test_padding_the_channel_axis_freezes_it():
    class ChannelPad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(10, 4, 1)

        def forward(self, x):
            return self.b(F.pad(self.a(x), (0, 0, 0, 0, 1, 1)))

    g = shave.capture(ChannelPad().eval(), (torch.randn(1, 3, 4, 4),))
    pruned = Prune(ratio=0.5, round_to=1)(g)
    assert pruned.params[pruned.nodes[0].inputs[1]].shape[0] == 8  # conv a feeds a padded channel axis
    x = torch.randn(1, 3, 4, 4)
    assert rel_err(shave.compile(g, (x,))(x.numpy()), run_graph(g, [x.numpy()])[0]) <= 1e-5


def test_resize_by_a_scale_that_is_not_size_ratio_is_one_clear_error():
    """PyTorch maps pixels through 1/scale (1/1.7 here), TVM through in/out (5/8): refused, not wrong."""
    model = _Fn(lambda y: F.interpolate(y, scale_factor=1.7, mode="nearest")).eval()
    with pytest.raises(shave.CompileError, match=r"resize by scale factor \(1.7, 1.7\) from \(5, 6\) to \(8, 10\)"):
        shave.compile(model, (torch.randn(1, 2, 5, 6),))


def test_repeat_along_channels_couples_the_copies_for_pruning():
    """conv(3->8) -> repeat x2 on channels -> conv(16->4): a pruned filter of the first conv
    removes both of its copies from the second conv's input."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).repeat(1, 2, 1, 1))

    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    cm = shave.compile(model, (x,))
    with torch.no_grad():
        assert rel_err(cm(x.numpy()), model(x).numpy()) <= 1e-5
    g = shave.capture(model, (x,))
    pruned = Prune(ratio=0.5, round_to=1)(g)
    convs = [n for n in pruned.nodes if n.op == "conv2d"]
    assert [pruned.type_of(c.inputs[1]).shape[:2] for c in convs] == [(4, 3), (4, 8)]


class Encoder(nn.Module):
    """A ViT-style block: patch conv, a class token expanded to the batch, a pre-norm transformer
    layer (scaled dot-product attention through nn.MultiheadAttention), the token's logits."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 32))
        self.patch = nn.Conv2d(3, 32, 4, 4)
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True,
                                              activation="gelu")
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = self.patch(x).flatten(2).transpose(1, 2)
        y = torch.cat([self.token.expand(x.shape[0], -1, -1), y], 1)
        return self.fc(self.enc(y)[:, 0])


@pytest.mark.parametrize("batch", [1, 3])
def test_attention_and_expand_capture_compile_and_prune(batch):
    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(batch, 3, 16, 16)
    g = shave.capture(model, (x,))
    counts = g.op_counts()
    assert counts.get("attention") == 1 and (batch == 1 or counts.get("repeat") == 1), counts
    cm = shave.compile(model, (x,))
    with torch.no_grad():
        ref = model(x).numpy()
    assert rel_err(cm(x.numpy()), ref) <= 1e-5
    # heads are not pruned through attention; the feed-forward hidden layer is
    pruned = Prune(ratio=0.5)(g)
    assert pruned.stats()["flops"] < g.stats()["flops"]
    assert all(pruned.type_of(n.inputs[0]) == g.type_of(n.inputs[0]) for n in pruned.nodes if n.op == "attention")
    cp = shave.compile(pruned, (x,))
    assert rel_err(cp(x.numpy()), run_graph(pruned, [x.numpy()])[0]) <= 1e-5


def test_attention_with_a_mask_is_one_clear_error():
    class Masked(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    with pytest.raises(shave.UnsupportedOpError, match="is_causal"):
        shave.capture(Masked(), (torch.randn(1, 2, 5, 8),))


def test_cross_attention_with_other_lengths_and_scale():
    """q and k/v of different lengths, head sizes that fill no whole vector, an explicit scale:
    the attention kernels (schedules/matmul.py) pad rows and columns inside and match torch."""
    class Cross(nn.Module):
        def forward(self, q, kv):
            return F.scaled_dot_product_attention(q, kv, kv * 0.5, scale=0.3)

    torch.manual_seed(0)
    q, kv = torch.randn(2, 3, 13, 20), torch.randn(2, 3, 29, 20)
    cm = shave.compile(Cross().eval(), (q, kv))
    with torch.no_grad():
        ref = Cross()(q, kv).numpy()
    assert rel_err(cm(q.numpy(), kv.numpy()), ref) <= 1e-5
    kernels = {c.kernel for c in cm.profile(q.numpy(), kv.numpy(), repeats=1).calls}
    assert {"shave_qk_6x13x29x20_s" + str(abs(hash(0.3)) % 10**6), "shave_softmax_78x32", "shave_pv_6x13x20x29"} \
        <= kernels, kernels
