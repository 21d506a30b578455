"""Each IR op compiled through TVM matches torch, on awkward shapes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shave
from conftest import rel_err


class Fn(nn.Module):
    def __init__(self, fn, *mods):
        super().__init__()
        self.fn = fn
        self.mods = nn.ModuleList(mods)

    def forward(self, *xs):
        return self.fn(self.mods, *xs)


def conv_mix():
    return Fn(lambda m, x: m[2](F.relu(m[1](m[0](x)))),
              nn.Conv2d(5, 6, 7, stride=2, padding=3, bias=False),  # 7x7 s2, odd channels
              nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6),  # depthwise, dilated
              nn.Conv2d(6, 9, 1, groups=3))  # grouped 1x1


def conv_transpose():
    return Fn(lambda m, x: m[1](m[0](x)), nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
              nn.ConvTranspose2d(4, 3, 2, stride=2, bias=False))


def pools():
    def f(m, x):
        return (F.max_pool2d(x, 3, 2, 1, ceil_mode=True), F.max_pool2d(x, 2, ceil_mode=True),
                F.avg_pool2d(x, 3, 2, 1, ceil_mode=True), F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
                F.avg_pool2d(x, 2), F.adaptive_avg_pool2d(x, (3, 2)), F.adaptive_avg_pool2d(x, 1),
                F.adaptive_max_pool2d(x, (1, 1)), x.mean((2, 3)), x.mean(1, keepdim=True))
    return Fn(f)


def activations():
    def f(m, x):
        return (F.relu6(x * 4) + F.hardswish(x) + F.hardsigmoid(x) + F.silu(x) + torch.sigmoid(x) + torch.tanh(x)
                + F.gelu(x) + F.gelu(x, approximate="tanh") + torch.clamp(x, -0.5, 0.7) + x.clamp(min=0.1)
                - x / 3 + 2 * x, torch.softmax(x, 1))
    return Fn(f)


def data_movement():
    def f(m, x):
        a, b = torch.split(x, [2, 4], dim=1)
        y = torch.cat([b, a, x[:, 1:5:2]], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)  # channel shuffle
        z = y.permute(0, 2, 3, 1)
        return z, torch.flatten(y, 1), y[:, 3].unsqueeze(1), x.chunk(3, dim=2)[2]
    return Fn(f)


def norms_and_linear():
    def f(m, x):
        y = m[0](x)  # BN without an affine
        z = m[1](y.permute(0, 2, 3, 1))  # layer norm over channels, channels-last
        return m[3](m[2](z)).permute(0, 3, 1, 2), m[4](torch.flatten(y, 1))
    bn = nn.BatchNorm2d(6, affine=False)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return Fn(f, bn, nn.LayerNorm(6), nn.Linear(6, 5), nn.GELU(), nn.Linear(6 * 7 * 9, 10))


def broadcasting():
    def f(m, x, y):
        gate = torch.sigmoid(x.mean((2, 3), keepdim=True))
        return x * gate + y, x - y * 0.5
    return Fn(f)


CASES = {
    "conv_mix": (conv_mix, [(1, 5, 13, 11)]),
    "conv_transpose": (conv_transpose, [(1, 6, 5, 7)]),
    "pools": (pools, [(2, 3, 11, 9)]),
    "activations": (activations, [(1, 6, 5, 5)]),
    "data_movement": (data_movement, [(1, 6, 9, 7)]),
    "norms_and_linear": (norms_and_linear, [(1, 6, 7, 9)]),
    "broadcasting": (broadcasting, [(1, 6, 7, 9), (1, 6, 7, 9)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_lowering_matches_torch(case):
    make, shapes = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    xs = tuple(torch.randn(s) for s in shapes)
    cm = shave.compile(model, xs, passes=[])
    with torch.no_grad():
        ref = model(*xs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    out = cm(*xs)
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        assert rel_err(o, r) < 1e-5, case


class _ShuffleUnits(nn.Module):
    """Two ShuffleNetV2 units at a channel count that is no multiple of a vector: split, a branch,
    concat, shuffle; then a gather of a gather (a shuffle of the shuffled tensor)."""

    def __init__(self, c=12):
        super().__init__()
        self.b1, self.b2 = nn.Conv2d(c // 2, c // 2, 1), nn.Conv2d(c // 2, c // 2, 3, padding=1)

    @staticmethod
    def shuffle(x, g=2):
        n, c, h, w = x.shape
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)

    def forward(self, x):
        for branch in (self.b1, self.b2):
            x1, x2 = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat((x1, torch.relu(branch(x2))), dim=1))
        return self.shuffle(self.shuffle(x, 3), 2)


def test_shuffles_and_their_splits_lower_to_fusible_slices():
    """A split (slice) of a shuffle (channel_permute) is folded into one gather of the shuffle's
    input; a gather of interleaved runs lowers to slices, a concat and a transpose (no take, which
    TVM does not fuse); the compiled model still computes the same."""
    from shave.backends.tvm.lower import fold_channel_gathers, to_relax
    from shave.backends.tvm.lower_float import interleaved_runs
    from shave.ir.opset_rewrites import shuffle_indices

    assert interleaved_runs(shuffle_indices(12, 2)) == [0, 6]
    assert interleaved_runs(shuffle_indices(12, 2)[:6]) == [0, 6]  # the first half: runs 0..2, 6..8
    assert interleaved_runs(shuffle_indices(12, 2)[6:]) == [3, 9]
    assert interleaved_runs(list(range(4, 9))) == [4]
    assert interleaved_runs([2, 0, 1]) == [2, 0, 1]  # three runs of one channel
    assert interleaved_runs([1, 0, 3, 2, 5, 4, 7, 6, 9, 8]) is None  # a take
    torch.manual_seed(0)
    model = _ShuffleUnits().eval()
    x = torch.randn(2, 12, 5, 7)
    graph = shave.capture(model, (x,))
    folded = fold_channel_gathers(graph)
    gathers = {n.name for n in folded.nodes if n.op == "channel_permute"}
    assert not any(n.inputs[0] in gathers for n in folded.nodes if n.op in ("slice", "channel_permute"))
    assert "take" not in to_relax(folded).script()
    cm = shave.compile(model, (x,), passes=[])
    with torch.no_grad():
        assert rel_err(cm(x), model(x)) < 1e-5


def test_unfused_batch_norms_lower_with_their_affine_folded():
    """A batch norm no conv absorbs (DenseNet's pre-activation ones, or with passes=[]) lowers to
    x * scale + shift with scale and shift computed from the parameters at lowering: no Relax op
    on constants alone is left for FoldConstant to compile and run at build time; on a blocked
    input between two conv kernels and on the NCHW input alike, the model still computes the same."""
    import tvm
    from tvm import relax

    from shave.backends.tvm.lower import to_relax

    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16)).eval()
    for bn in (model[0], model[2], model[5]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 9, 9)
    graph = shave.capture(model, (x,))
    assert sum(n.op == "batch_norm" for n in graph.nodes) == 3
    mod = to_relax(graph)
    on_constants = []

    def visit(e):
        if isinstance(e, relax.Call) and e.args and all(isinstance(a, tvm.ir.expr.Constant) for a in e.args):
            on_constants.append(str(e.op))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    assert on_constants == []
    cm = shave.compile(model, (x,), passes=[])
    with torch.no_grad():
        assert rel_err(cm(x), model(x)) < 1e-5
