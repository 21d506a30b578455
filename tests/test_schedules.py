"""Scheduled conv kernels and the generic CPU rule against PyTorch, over awkward shapes."""
import dataclasses
import re
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import shave
from shave.backends.tvm.lower import to_relax
from shave.backends.tvm.schedules import schedule_module
from shave.isa import isa
from conftest import AVX2, AVX512, AVX512_VNNI, NEON, NEON_DOT, asm_of, runs_here, workspace_calls_in_parallel_loops

# the kernels' parallel path, which a model's large kernels take (test_small_kernels_run_serially: the other)
pytestmark = pytest.mark.usefixtures("parallel_kernels")

TOL = 1e-5


class ConvAct(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, dilation=1, groups=1, bias=True, act=None, residual=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias)
        self.act = act
        self.residual = residual

    def forward(self, x):
        y = self.conv(x)
        if self.residual:
            y = y + x
        if self.act == "relu":
            y = torch.relu(y)
        elif self.act == "relu6":
            y = torch.clamp(y, 0.0, 6.0)
        return y


CASES = {
    # name: (module args, input shape)
    "3x3_c5_oc13_pad": (dict(cin=5, cout=13, k=3, padding=1, act="relu"), (1, 5, 11, 9)),
    "3x3_s2_c17_oc3": (dict(cin=17, cout=3, k=3, stride=2, padding=1), (1, 17, 13, 15)),
    "7x7_s2_stem_c3": (dict(cin=3, cout=16, k=7, stride=2, padding=3, act="relu"), (1, 3, 29, 31)),
    "1x1_c13_oc17": (dict(cin=13, cout=17, k=1, act="relu6"), (1, 13, 7, 5)),
    "3x3_grouped2_c16_oc32": (dict(cin=16, cout=32, k=3, padding=1, groups=2, act="relu"), (1, 16, 9, 7)),
    "1x1_grouped4_c8_oc32_s2": (dict(cin=8, cout=32, k=1, stride=2, groups=4), (2, 8, 9, 11)),
    "1x1_grouped2_c32_residual": (dict(cin=32, cout=32, k=1, groups=2, residual=True, act="relu"), (1, 32, 5, 6)),
    # groups narrower than a vector block: merged (4 groups of 4 -> 2 of 8; 12 of 2 -> 3 of 8 outputs; 3 -> 1)
    "3x3_grouped4_c16_oc16_merged": (dict(cin=16, cout=16, k=3, padding=1, groups=4, act="relu"), (1, 16, 7, 9)),
    "3x3_dw_multiplier2_c12_merged": (dict(cin=12, cout=24, k=3, padding=1, groups=12), (2, 12, 6, 5)),
    "1x1_grouped3_c6_oc12_merged": (dict(cin=6, cout=12, k=1, groups=3), (1, 6, 5, 5)),
    "1x1_spatial_1x1": (dict(cin=24, cout=40, k=1, act="relu"), (1, 24, 1, 1)),
    "1x1_residual": (dict(cin=16, cout=16, k=1, residual=True), (1, 16, 7, 7)),
    "3x3_residual_relu": (dict(cin=9, cout=9, k=3, padding=1, act="relu", residual=True), (1, 9, 5, 6)),
    "3x3_no_bias_w5": (dict(cin=8, cout=24, k=3, padding=1, bias=False), (1, 8, 5, 5)),
    "dilation2": (dict(cin=6, cout=10, k=3, padding=2, dilation=2, act="relu"), (1, 6, 12, 10)),
    "asym_pad_kernel": (dict(cin=4, cout=12, k=(3, 5), padding=(1, 2)), (1, 4, 9, 14)),
    "dw3x3_s1_c13": (dict(cin=13, cout=13, k=3, padding=1, groups=13, act="relu6"), (1, 13, 7, 7)),
    "dw3x3_s2_c17": (dict(cin=17, cout=17, k=3, stride=2, padding=1, groups=17, act="relu6"), (1, 17, 14, 11)),
    "dw_5x5_no_pad": (dict(cin=8, cout=8, k=5, groups=8), (1, 8, 9, 9)),
    "grouped_g2_fallback": (dict(cin=6, cout=10, k=3, padding=1, groups=2, act="relu"), (1, 6, 8, 8)),
    "dw_multiplier2_fallback": (dict(cin=4, cout=8, k=3, padding=1, groups=4), (1, 4, 8, 8)),
    "batch2_s2": (dict(cin=5, cout=9, k=3, stride=2, padding=1, act="relu"), (2, 5, 10, 10)),
    "wide_w_odd": (dict(cin=8, cout=16, k=3, padding=1, act="relu"), (1, 8, 3, 61)),
}


def _check(model, x):
    model.eval()
    with torch.no_grad():
        ref = model(x).numpy()
    cm = shave.compile(model, (x,), passes=[])
    out = cm(x.numpy())
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert out.shape == ref.shape
    assert err <= TOL, err


@pytest.mark.parametrize("name", sorted(CASES))
def test_conv_matches_torch(name):
    kw, shape = CASES[name]
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)
    model = ConvAct(**kw)
    _check(model, torch.randn(shape))


class Block(nn.Module):
    """conv -> bn -> relu6, depthwise, 1x1 project with residual, max pool, avg pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.pw(self.dw(y))
        y = self.pool(y)
        return self.fc(y.mean((2, 3)))


def test_small_network_with_default_passes():
    torch.manual_seed(0)
    model = Block().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 23, 19)
    with torch.no_grad():
        ref = model(x).numpy()
    out = shave.compile(model, (x,))(x.numpy())
    assert np.abs(out - ref).max() / np.abs(ref).max() <= TOL


def _scheduled_kernels(model, x):
    graph = shave.capture(model.eval(), (x,))
    target = AVX2  # layouts and tiles depend on the vector width: an explicit one, not the host's
    import tvm

    with tvm.target.Target(target):
        mod = schedule_module(to_relax(graph, target), target)
    return [gv.name_hint for gv in mod.functions if gv.name_hint.startswith("shave_conv")], mod


def test_rewrite_fuses_dense_and_grouped_convs():
    x = torch.randn(1, 6, 8, 8)
    names, mod = _scheduled_kernels(ConvAct(6, 12, 3, padding=1, act="relu"), x)
    assert len(names) == 1
    for cin, cout, groups, shape in [(6, 12, 2, (1, 6, 8, 8)), (16, 32, 2, (1, 16, 8, 8)), (8, 24, 8, (1, 8, 5, 5))]:
        names, mod = _scheduled_kernels(ConvAct(cin, cout, 3, padding=1, groups=groups), torch.randn(shape))
        assert len(names) == 1  # grouped convs too (narrow groups merged)
    for f in mod.functions.values():
        if hasattr(f, "attrs") and f.attrs is not None and "op_pattern" in f.attrs:
            assert int(f.attrs["op_pattern"]) == 8


class SEBlock(nn.Module):
    """MobileNetV3 / EfficientNet style: conv -> hardswish or SiLU, an SE gate (1x1 convs on the
    pooled map, relu / SiLU, then sigmoid) multiplying it, a projection."""

    def __init__(self, act, gate):
        super().__init__()
        self.expand, self.act, self.gate = nn.Conv2d(8, 16, 1), act(), gate()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.act(self.dw(self.act(self.expand(x))))
        gate = self.gate(self.fc2(self.act(self.fc1(y.mean((2, 3), keepdim=True)))))
        return x + self.project(y * gate)


@pytest.mark.parametrize("act, gate", [(nn.Hardswish, nn.Hardsigmoid), (nn.SiLU, nn.Sigmoid)],
                         ids=["mobilenet_v3", "efficientnet"])
def test_hardswish_silu_and_gates_fuse_into_conv_kernels(act, gate):
    """Every activation right after a conv is computed in that conv kernel's epilogue: the scheduled
    module has the conv kernels and only the SE block's pool and gate multiply besides, both on the
    blocked layout."""
    torch.manual_seed(0)
    model, x = SEBlock(act, gate).eval(), torch.randn(1, 8, 9, 11)
    names, mod = _scheduled_kernels(model, x)
    assert len(names) == 5  # expand, dw, fc1, fc2, project
    others = [gv.name_hint for gv, f in mod.functions.items()
              if gv.name_hint != "main" and not gv.name_hint.startswith("shave_conv")]
    assert not [n for n in others if any(a in n for a in ("sigmoid", "silu", "clip", "divide"))], others
    specs = _kernel_specs(model, x)
    acts = {s.act for s in specs}
    assert acts == ({"hardswish", "hardsigmoid", None} if act is nn.Hardswish else {"silu", "sigmoid", None})
    # the SE block stays in the blocked layout: the depthwise output is read by the global pool and
    # the gate multiply on its blocks, and the projection reads the gated blocks
    layout = {(s.c, s.oc, s.kh, s.depthwise): (s.in_blocked, s.out_blocked) for s in specs}
    assert layout[(16, 16, 3, True)] == (True, True) and layout[(16, 8, 1, False)][0] is True
    others = [gv.name_hint for gv in mod.functions if gv.name_hint != "main" and not gv.name_hint.startswith("shave_conv")]
    assert not any("transpose" in n or "layout" in n for n in others), others
    _check(model, x)


class Chain(nn.Module):
    """Convs feeding convs (blocked in between), a 12-channel layer (not a multiple of 8: blocked
    with padding lanes), a residual read blocked, and a conv output also read by a max pool
    (which reads the blocked layout too)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, 2, 1)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.odd = nn.Conv2d(16, 12, 3, 1, 1)
        self.b = nn.Conv2d(12, 16, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y + self.pw(torch.clamp(self.dw(y), 0, 6))
        z = self.b(torch.relu(self.odd(y)))
        return z.mean((2, 3)) + nn.functional.max_pool2d(y, 2).mean((2, 3))


def _kernel_specs(model, x):
    """The ConvSpecs of the conv kernels the schedule makes for `model`."""
    import tvm

    target = AVX2
    kernels = {}
    with tvm.target.Target(target):
        schedule_module(to_relax(shave.capture(model, (x,)), target, kernels), target)
    return list(kernels)


def test_activations_between_conv_kernels_stay_blocked():
    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(2, 3, 15, 13)
    kernels = _kernel_specs(model, x)
    layout = {(s.c, s.oc, s.kh, s.depthwise): (s.in_blocked, s.out_blocked, s.res_blocked) for s in kernels}
    assert layout[(3, 16, 3, False)] == (False, True, False)  # graph input NCHW; output read by dw and pw only
    assert layout[(16, 16, 3, True)] == (True, True, False)
    assert layout[(16, 16, 1, False)] == (True, True, True)  # also read by the max pool, on the blocked layout
    assert layout[(16, 12, 3, False)] == (True, True, False)  # 12 output channels: 2 blocks, 4 padding lanes
    assert layout[(12, 16, 1, False)] == (True, True, False)  # read only by a global mean: blocked
    _check(model, x)


class Ragged(nn.Module):
    """Channel counts that are not a multiple of the vector width (MobileNetV3's 72 / 88 / 120 on
    16 lanes, here 12 and 20 on 8 and 16): a dense conv, a depthwise conv, an SE block (global
    pool, gate multiply), a residual, a global pool, with sigmoids, whose padding lanes hold
    0.5 (act(0)), not 0: a kernel that read them into a real channel would be wrong."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 20, 3, 2, 1), nn.Sigmoid())
        self.dw = nn.Sequential(nn.Conv2d(20, 20, 5, 1, 2, groups=20), nn.Sigmoid())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(20, 6, 1), nn.ReLU(), nn.Conv2d(6, 20, 1),
                                nn.Hardsigmoid())
        self.pw = nn.Conv2d(20, 12, 1)
        self.b = nn.Conv2d(12, 20, 1)
        self.c = nn.Conv2d(20, 12, 3, 1, 1)

    def forward(self, x):
        y = self.a(x)
        z = self.dw(y)
        z = self.pw(z * self.se(z))
        return (z + self.c(torch.sigmoid(self.b(z) + y))).mean((2, 3))


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_ragged_channels_stay_blocked(target):
    """12 and 20 channels fill no whole 8- or 16-lane block; every kernel still reads and writes the
    blocked layout (the last block padded), the SE block and the pools read it, and the model
    computes what torch does (where the host runs the target)."""
    import tvm

    torch.manual_seed(0)
    model, x = Ragged().eval(), torch.randn(2, 3, 17, 15)
    kernels = {}
    with tvm.target.Target(target):
        mod = schedule_module(to_relax(shave.capture(model, (x,)), target, kernels), target)
    layout = {(s.c, s.oc, s.kh): (s.in_blocked, s.out_blocked, s.residual and s.res_blocked) for s in kernels}
    assert layout[(3, 20, 3)] == (False, True, False)  # the graph input is NCHW
    assert layout[(20, 20, 5)] == (True, True, False)
    assert layout[(20, 12, 1)] == (True, True, False)  # reads the gated blocks
    assert layout[(12, 20, 1)] == (True, True, True)  # + y, blocked
    assert layout[(20, 12, 3)] == (True, True, True)  # + z, blocked; read by the global mean only
    others = [gv.name_hint for gv in mod.functions if gv.name_hint != "main" and not gv.name_hint.startswith("shave_")]
    assert not any("transpose" in n or "layout" in n for n in others), others
    if runs_here(target):
        with torch.no_grad():
            ref = model(x).numpy()
        cm = shave.compile(model, (x,), target=target, passes=[])
        assert np.abs(cm(x.numpy()) - ref).max() / np.abs(ref).max() <= TOL


@pytest.mark.parametrize("target,k", [(AVX2, 7), (AVX512, 5)], ids=["avx2-7x7", "avx512-5x5"])
def test_wide_depthwise_tiles_on_a_blocked_input(target, k):
    """A depthwise kernel whose whole input patch (k rows) would fit only a 1-column tile in a
    stack array (7x7 on 8 lanes, 5x5 on 16) packs one kernel row at a time: a tile of several
    columns, with no workspace call inside its parallel loop, computing what torch does."""
    import tvm

    torch.manual_seed(0)
    c = 24
    model = nn.Sequential(nn.Conv2d(3, c, 1), nn.ReLU(), nn.Conv2d(c, c, k, 1, k // 2, groups=c), nn.ReLU(),
                          nn.Conv2d(c, 8, 1)).eval()
    x = torch.randn(1, 3, 19, 23)
    kernels = {}
    with tvm.target.Target(target):
        schedule_module(to_relax(shave.capture(model, (x,)), target, kernels), target)
    (dw,) = [s for s in kernels if s.depthwise]
    assert dw.in_blocked and dw.vec == isa(target).fp32_lanes
    from shave.backends.tvm.schedules.conv import build_primfunc, default_tile

    assert default_tile(dw)[1] >= 4
    ex = tvm.compile(tvm.IRModule({"main": build_primfunc(dw)}), target=tvm.target.Target(target))
    assert workspace_calls_in_parallel_loops(ex) == 0
    if runs_here(target):
        with torch.no_grad():
            ref = model(x).numpy()
        cm = shave.compile(model, (x,), target=target, passes=[])
        assert np.abs(cm(x.numpy()) - ref).max() / np.abs(ref).max() <= TOL


def test_a_registered_kernel_class_takes_the_convs_it_chooses(monkeypatch):
    """The conv kernels are a registry of classes (schedules/kernels.py): one registered with a
    higher priority than the direct kernel takes the convs its `chosen` accepts, in the plan,
    the lowering and the build, and nothing else changes (here a copy of the direct kernel for
    the 1x1 convs); an unknown kernel name is a clear error."""
    import tvm

    from shave.backends.tvm.schedules import conv, kernels

    class Pointwise(conv.Direct):
        name, priority = "test_pointwise", 5

        def chosen(self, spec):
            return (spec.kh, spec.kw) == (1, 1) and not spec.depthwise

    monkeypatch.setitem(kernels.REGISTRY, Pointwise.name, Pointwise())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 1), nn.ReLU(),
                          nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.Conv2d(24, 16, 1)).eval()
    x = torch.randn(1, 3, 10, 9)
    specs = {}
    with tvm.target.Target(AVX2):
        schedule_module(to_relax(shave.capture(model, (x,)), AVX2, specs), AVX2)
    assert sorted((s.kh, s.kernel) for s in specs) == [(1, "test_pointwise"), (1, "test_pointwise"),
                                                       (3, "direct"), (3, "direct")]
    with torch.no_grad():
        ref = model(x).numpy()
    cm = shave.compile(model, (x,), target=AVX2, passes=[])
    assert np.abs(cm(x.numpy()) - ref).max() / np.abs(ref).max() <= TOL
    with pytest.raises(ValueError, match="unknown conv kernel 'nope'"):
        kernels.kernel_of(dataclasses.replace(next(iter(specs)), kernel="nope"))


class Passthrough(nn.Module):
    """Concats, pools and a batch norm -> relu between conv kernels (SqueezeNet, Inception,
    DenseNet), and the cases that need NCHW: a concat with a 12-channel part, an average pool
    whose divisor varies at the border."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, 1, 1), nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(24)
        self.c, self.d = nn.Conv2d(24, 16, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.e, self.odd = nn.Conv2d(32, 16, 1), nn.Conv2d(16, 12, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], 1)  # 16 + 8 channels: blocks concatenated
        y = nn.functional.max_pool2d(y, 3, 2, ceil_mode=True)  # a last window reaching past the edge
        z = self.c(torch.relu(self.bn(y)))  # DenseNet's pre-activation
        w = torch.cat([nn.functional.avg_pool2d(z, 3, 1, 1), self.d(z)], 1)  # Inception's pool branch
        w = self.e(nn.functional.avg_pool2d(w, 2))  # DenseNet's transition
        u = torch.cat([w, self.odd(w)], 1)  # 16 + 12 channels: NCHW
        v = nn.functional.avg_pool2d(w, 3, 1, 1, count_include_pad=False)  # divisor varies: NCHW
        return torch.cat([u.mean((2, 3)), v.mean((2, 3))], 1)


def test_concat_pools_and_norms_between_conv_kernels_stay_blocked():
    from shave.backends.tvm.schedules.fusion import plan_convs

    torch.manual_seed(0)
    model, x = Passthrough().eval(), torch.randn(2, 3, 17, 15)
    graph = shave.capture(model, (x,))
    plan = plan_convs(graph, isa(AVX2))
    kinds = sorted(plan.passthrough.values())
    assert kinds == ["activation", "avg_pool", "avg_pool", "batch_norm", "concat", "concat", "max_pool"], kinds
    assert {graph.node(n).op for n in plan.passthrough} == {"concat", "max_pool2d", "avg_pool2d", "batch_norm", "relu"}
    layout = {(s.c, s.oc, s.kh): (s.in_blocked, s.out_blocked) for s in _kernel_specs(model, x)}
    assert layout[(3, 16, 3)] == layout[(3, 8, 1)] == (False, True)  # read by the concat
    assert layout[(24, 16, 1)] == layout[(16, 16, 3)] == (True, True)
    assert layout[(32, 16, 1)] == (True, False)  # read by the 28-channel concat and the varying-divisor pool
    _check(model, x)


class RaggedStem(nn.Module):
    """ShuffleNetV2's stem: a conv to a channel count that fills no whole block (20 on 8 or 16
    lanes) -> max pool -> convs, one through an average pool and a sigmoid; and a 20-channel batch
    norm, which needs whole blocks."""

    def __init__(self):
        super().__init__()
        self.stem, self.dw, self.pw = nn.Conv2d(3, 20, 3, 2, 1), nn.Conv2d(20, 20, 3, 2, 1, groups=20), nn.Conv2d(20, 24, 1)
        self.c, self.bn, self.out = nn.Conv2d(20, 20, 1), nn.BatchNorm2d(20), nn.Conv2d(20, 16, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = nn.functional.max_pool2d(torch.relu(self.stem(x)), 3, 2, 1)
        z = torch.sigmoid(nn.functional.avg_pool2d(self.dw(y), 2))
        return torch.cat([self.pw(y).mean((2, 3)), self.out(z).mean((2, 3)), self.bn(self.c(y)).mean((2, 3))], 1)


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_pools_and_activations_pass_ragged_blocks_through(target):
    """A max pool, an average pool and a sigmoid on 20 channels (a padded last block) keep the
    blocked layout between conv kernels; the 20-channel batch norm does not (NCHW). Computes what
    torch does where the host runs the target."""
    import tvm

    from shave.backends.tvm.schedules.fusion import plan_convs

    torch.manual_seed(0)
    model, x = RaggedStem().eval(), torch.randn(2, 3, 33, 31)
    graph = shave.capture(model, (x,))
    plan = plan_convs(graph, isa(target))
    assert sorted(plan.passthrough.values()) == ["activation", "avg_pool", "max_pool"], plan.passthrough
    kernels = {}
    with tvm.target.Target(target):
        schedule_module(to_relax(graph, target, kernels), target)
    layout = {(s.c, s.oc, s.depthwise): (s.in_blocked, s.out_blocked) for s in kernels}
    assert layout[(3, 20, False)] == (False, True)  # read by the max pool
    assert layout[(20, 20, True)] == (True, True)  # reads the max pool, read by the average pool
    assert layout[(20, 24, False)][0] and layout[(20, 16, False)][0]  # read the max pool, the sigmoid
    assert layout[(20, 20, False)] == (True, False)  # read by the batch norm
    if runs_here(target):
        with torch.no_grad():
            ref = model(x).numpy()
        cm = shave.compile(model, (x,), target=target, passes=[])
        assert np.abs(cm(x.numpy()) - ref).max() / np.abs(ref).max() <= TOL


def test_blocked_pools_on_vectors():
    """The blocked pools' lane loop is vectorised (AVX2: a vmaxps / vaddps on ymm), whatever the host."""
    import tvm

    from shave.backends.tvm.schedules.generic import schedule_func
    from shave.backends.tvm.schedules.pool import blocked_pool_primfunc

    for kind, op in (("max", "vmaxps"), ("avg", "vaddps")):
        prim = blocked_pool_primfunc(kind, (1, 2, 9, 9, 8), (4, 4), (3, 3), (2, 2), (0, 0, 1, 1), (1, 1))
        mod = tvm.IRModule({"main": schedule_func(prim, 8).with_attr("global_symbol", "main")})
        asm = asm_of(tvm.compile(mod, target=tvm.target.Target(AVX2)))
        assert op in asm and "%ymm" in asm, kind


class MLP(nn.Module):
    def __init__(self, k, j, bias):
        super().__init__()
        self.fc1 = nn.Linear(k, j, bias=bias)
        self.fc2 = nn.Linear(j, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("n,k,j,bias", [(1, 64, 10, True), (3, 37, 13, False), (8, 130, 100, True)])
def test_linear_layers_become_conv_kernels(n, k, j, bias):
    torch.manual_seed(n)
    model, x = MLP(k, j, bias), torch.randn(n, k)
    names, _ = _scheduled_kernels(model, x)
    assert len(names) == 2  # both linear layers run on the packed conv kernel
    assert {s.act for s in _kernel_specs(model, x)} == {"relu", None}  # the relu in fc1's epilogue
    _check(model, x)


class ChannelsLastMLP(nn.Module):
    """ConvNeXt's block: a conv, then linear layers on the channels-last (N, H, W, C) view."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x):
        y = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.fc2(torch.relu(self.fc1(y))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("shape", [(1, 3, 7, 9), (2, 3, 5, 6)])
def test_linear_layers_on_channels_last_maps_become_conv_kernels(shape):
    """A linear layer on x[N, H, W, C] runs on the conv kernel over its [N*H*W, C] view (TVM's own
    matmul took 1.4 s for one of ConvNeXt-T's 7x7x768 -> 3072 layers)."""
    torch.manual_seed(0)
    model, x = ChannelsLastMLP().eval(), torch.randn(*shape)
    names, _ = _scheduled_kernels(model, x)
    assert len(names) == 3  # the conv and both linear layers
    assert sorted((s.c, s.oc, s.w, s.act) for s in _kernel_specs(model, x) if s.kh == 1 and s.h == 1) == \
        sorted([(16, 48, shape[0] * shape[2] * shape[3], "relu"), (48, 16, shape[0] * shape[2] * shape[3], None)])
    _check(model, x)


@pytest.mark.parametrize("c,hw,k,dil,pad,groups,kept", [
    (16, 14, 3, 24, 24, 1, (1, 1, (0, 0, 0, 0))),  # DeepLabV3's ASPP rate 24 on a 14x14 map: a 1x1 conv
    (16, 14, 3, 36, 36, 1, (1, 1, (0, 0, 0, 0))),
    (16, 14, 3, 12, 12, 1, (3, 3, (12, 12, 12, 12))),  # every tap reads the map somewhere: unchanged
    (8, 2, 5, 1, 2, 1, (3, 3, (1, 1, 1, 1))),  # a 5x5 on a 2x2 map: its outer ring reads only padding
    (8, 3, 5, 3, 6, 8, (1, 1, (0, 0, 0, 0))),  # depthwise
])
def test_taps_that_read_only_padding_are_dropped(c, hw, k, dil, pad, groups, kept):
    torch.manual_seed(0)
    model, x = nn.Conv2d(c, 16 if groups == 1 else c, k, 1, pad, dil, groups).eval(), torch.randn(1, c, hw, hw)
    (spec,) = _kernel_specs(model, x)
    assert (spec.kh, spec.kw, spec.pad) == kept
    _check(model, x)


class TwoBranches(nn.Module):
    """ResNet's downsampling block after fold_bn: the sum of two convs, then relu."""

    def __init__(self):
        super().__init__()
        self.main, self.short = nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(8, 16, 1, 2)

    def forward(self, x):
        return torch.relu(self.main(x) + self.short(x))


def test_sum_of_two_convs_fuses_into_one_of_them():
    """The add (and the relu after it) goes into the first conv's epilogue, the other conv's output
    is its residual; the second conv must not claim the same add."""
    torch.manual_seed(0)
    model, x = TwoBranches().eval(), torch.randn(1, 8, 10, 10)
    specs = _kernel_specs(model, x)
    assert sorted((s.kh, s.residual, s.act) for s in specs) == [(1, False, None), (3, True, "relu")]
    assert [s.out_blocked for s in specs if s.kh == 1] == [True]  # read only as the residual: blocked
    _check(model, x)


class NaNPaths(nn.Module):
    """relu/relu6/clamp/hardswish fused into conv kernels and as separate kernels."""

    def __init__(self):
        super().__init__()
        self.c, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.c(x))
        return (y.mean((2, 3)), nn.functional.relu6(x * 2), nn.functional.hardswish(self.c2(y)),
                torch.relu(x), torch.clamp(x, -0.5, 0.5))


def test_activations_keep_nan_as_pytorch_does():
    """max(NaN, 0) is 0 in TVM's TOPI code; PyTorch's relu, relu6, clamp and hardswish keep NaN."""
    torch.manual_seed(0)
    model = NaNPaths().eval()
    x = torch.randn(1, 3, 6, 6)
    cm = shave.compile(model, (x,))
    x[0, 1, 2, 3] = float("nan")
    with torch.no_grad():
        ref = model(x)
    for r, g in zip(ref, cm(x)):
        assert torch.equal(torch.isnan(r), torch.isnan(g))
        torch.testing.assert_close(torch.nan_to_num(g, 7.0), torch.nan_to_num(r, 7.0), rtol=1e-5, atol=1e-5)


def _elementwise_on_avx2(fn, x: np.ndarray):
    """(fn applied to every element of x by a TIR kernel built for AVX2 and run here, the library)."""
    import tvm
    from tvm import te

    X = te.placeholder(x.shape, "float32")
    f = te.create_prim_func([X, te.compute(x.shape, lambda i: fn(X[i]))])
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=tvm.target.Target(AVX2))
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), out)
    return out.numpy(), lib


def test_vector_sigmoid_is_accurate_and_has_no_libm_calls():
    """The SiLU / sigmoid epilogue: within 2e-7 relative of torch over [-100, 100], NaN kept, and no
    per-lane expf call left in the kernel (LLVM's llvm.exp scalarises to them)."""
    import tvm

    from shave.backends.tvm.schedules.conv import ConvSpec, build_primfunc
    from shave.backends.tvm.schedules.legalize import vector_sigmoid

    x = np.concatenate([np.linspace(-100, 100, 20001, dtype=np.float32), np.float32([np.nan, np.inf, -np.inf])])
    got, _ = _elementwise_on_avx2(vector_sigmoid, x)
    ref = torch.sigmoid(torch.from_numpy(x)).numpy()
    assert np.isnan(got[-3]) and got[-2] == 1.0 and abs(got[-1]) < 1e-37
    big = np.abs(ref[:-3]) > 1e-30
    assert (np.abs(got[:-3] - ref[:-3])[big] / ref[:-3][big]).max() <= 2e-7
    spec = ConvSpec(1, 16, 7, 7, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, "silu", False, 8)
    asm = asm_of(tvm.compile(tvm.IRModule({"main": build_primfunc(spec)}), target=tvm.target.Target(AVX2)))
    assert not re.search(r"call\s+\S*expf", asm) and "vfmadd" in asm


def test_vector_gelu_is_accurate_and_has_no_libm_calls():
    """GELU's erf as a rational function (legalize.vector_erf): within 1e-6 of the exact GELU
    over [-10, 10], NaN and infinities as PyTorch's AVX2 kernel, no erff call left in the legalized kernel."""
    import math

    from shave.backends.tvm.schedules.legalize import vector_gelu

    x = np.concatenate([np.linspace(-10, 10, 20001, dtype=np.float32), np.float32([np.nan, np.inf, -np.inf])])
    got, lib = _elementwise_on_avx2(vector_gelu, x)
    # against the exact GELU in float64 (PyTorch's own float32 GELU is itself ~1e-6 off, differently
    # in its AVX2 and AVX-512 kernels, so the two can differ by more than either does from the truth)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x[:-3].astype(np.float64)])
    assert np.abs(got[:-3] - exact).max() <= 1e-6
    # nan, inf (the limit), nan (-inf * 0): what PyTorch's AVX2 kernel gives (its AVX-512 kernel gives nan for inf)
    np.testing.assert_array_equal(got[-3:], np.float32([np.nan, np.inf, np.nan]))
    assert not re.search(r"call\s+\S*erff", asm_of(lib)) and "vfmadd" in asm_of(lib)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU()).eval()
    xi = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        ref = model(xi).numpy()
    got = shave.compile(model, (xi,))(xi.numpy())
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_isa_of_explicit_targets():
    """One description per target, from LLVM's features for its mcpu/mattr, never from the host."""
    x86 = lambda cpu: isa({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})  # noqa: E731
    got = {name: (d.fp32_lanes, d.vector_registers, d.int8_dot, d.fp32_flops_per_cycle) for name, d in [
        ("znver3", x86("znver3")), ("znver4", x86("znver4")), ("haswell", isa(AVX2)), ("skylake-avx512", isa(AVX512)),
        ("icelake-server", isa(AVX512_VNNI)), ("sapphirerapids", x86("sapphirerapids")),
        ("alderlake", x86("alderlake")), ("x86-64", x86("x86-64")), ("a72", isa(NEON)), ("a76", isa(NEON_DOT)),
        ("h100", isa("h100"))]}
    # Zen 4 runs a zmm FMA as two ymm halves: 32 FLOP per cycle, as AVX2
    assert got == {"znver3": (8, 16, "avx2", 32), "znver4": (16, 32, "avx512_vnni", 32), "haswell": (8, 16, "avx2", 32),
                   "skylake-avx512": (16, 32, "avx2", 64), "icelake-server": (16, 32, "avx512_vnni", 64),
                   "sapphirerapids": (16, 32, "avx512_vnni", 64), "alderlake": (8, 16, "avx_vnni", 32),
                   "x86-64": (4, 16, "none", 8), "a72": (4, 32, "none", 16), "a76": (4, 32, "neon_dot", 16),
                   "h100": (1, 0, "none", 2)}
    assert isa(AVX2).int8_pairs_saturate and not isa(AVX512_VNNI).int8_pairs_saturate
    assert isa("rpi5").int8_dot == "neon_dot" and isa("rpi4").channel_multiple == 4
    assert isa("h100").channel_multiple == 8


# fp32 conv kernels for each vector ISA: (target, lanes, what the inner loop's FMA looks like)
FP32_ISAS = {"avx2": (AVX2, 8, r"vfmadd\d+ps\s+[^\n]*%ymm"), "avx512": (AVX512, 16, r"vfmadd\d+ps\s+[^\n]*%zmm"),
             "neon": (NEON, 4, r"fmla\s+v\d+\.4s")}


@pytest.mark.parametrize("isa_name", sorted(FP32_ISAS))
@pytest.mark.parametrize("name", ["3x3_c16_oc24_w13_blocked", "dw_s2_c19", "1x1_c40_oc70"])
def test_fp32_conv_kernel_for_each_isa(isa_name, name):
    """Each ISA's kernel is built whatever the host and has its vector FMAs (ymm / zmm / NEON .4s);
    it is run against torch where the host can run it (AVX-512 code needs an AVX-512 host, NEON
    code runs under emulation in test_targets instead)."""
    import tvm

    from shave.backends.tvm.schedules.conv import ConvSpec, build_primfunc, candidate_tiles

    target, lanes, fma = FP32_ISAS[isa_name]
    fields = TILE_SPECS[name]
    blocked = name in BLOCKED_SPECS and fields[1] % lanes == 0 and fields[4] % lanes == 0
    spec = ConvSpec(*fields, vec=lanes, regs=isa(target).vector_registers, in_blocked=blocked,
                    out_blocked=blocked, res_blocked=blocked and fields[-1])
    lib = tvm.compile(tvm.IRModule({"main": build_primfunc(spec)}), target=tvm.target.Target(target))
    asm = asm_of(lib)
    assert re.search(fma, asm), f"no {isa_name} vector FMA in the kernel"
    if isa_name == "avx2":
        assert "%zmm" not in asm
    # the tile search tries larger register tiles where there are 32 registers, not with 16
    wide = ConvSpec(1, 64, 14, 14, 128, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, None, False, lanes,
                    regs=isa(target).vector_registers)
    assert any(o * r > 14 for o, r in candidate_tiles(wide)) == (isa(target).vector_registers == 32)
    if runs_here(target):
        assert _kernel_error(spec, _conv_case(fields), target) <= TOL


TILE_SPECS = {
    # name: ConvSpec fields n, c, h, w, oc, kh, kw, stride, pad, dilation, depthwise, act, residual
    "3x3_c5_oc27_w13": (1, 5, 9, 13, 27, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", True),
    "stem_s2_c3": (1, 3, 15, 17, 16, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), False, None, False),
    "1x1_c40_oc70": (1, 40, 5, 11, 70, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, "clip:0.0:6.0", False),
    "dw_s2_c19": (1, 19, 13, 15, 19, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), True, "clip:0.0:6.0", False),
}
# the same kernels with input, output and residual in the blocked [N, C/8, H, W, 8] layout
BLOCKED_SPECS = {
    "3x3_c16_oc24_w13_blocked": (2, 16, 9, 13, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", True),
    "1x1_s2_c32_oc16_blocked": (1, 32, 11, 10, 16, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), False, None, True),
    "dw_s1_c24_blocked": (1, 24, 13, 15, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), True, "clip:0.0:6.0", True),
    "dw_s2_c16_blocked": (2, 16, 14, 9, 16, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), True, "relu", False),
    "3x3_grouped2_c32_oc16_blocked": (1, 32, 7, 9, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", True),
    # no padding and tiles that divide the width: the kernel reads X in place (no input copy)
    "3x3_pad0_c16_oc16_blocked": (1, 16, 10, 12, 16, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), False, None, False),
    # 1x1 stride 1 unpadded: computed on the flat 1 x H*W view (flat_view); 3 output blocks
    # (tile 3 x n), batch 2, a residual, tiles that do not divide 7*7 (a padded tail)
    "1x1_flat_c24_oc24_7x7_blocked": (2, 24, 7, 7, 24, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, "relu", True),
    # H*W = 17*17 = 289 columns: 58 tiles of 5, whose divisors give chunks of 10 columns, so the
    # row is padded to whole chunks of 32+ columns (chunked_width)
    "1x1_flat_c16_oc16_17x17_blocked": (1, 16, 17, 17, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, "relu", True),
    # tiles along H*W = 48 that divide it: X read in place across row ends
    "1x1_flat_pad0_c16_oc40_8x6_blocked": (1, 16, 8, 6, 40, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, None, False),
    # grouped at stride 2: the input rows of each parallel task packed inside the task; groups of two
    # blocks (48 channels in 3 groups) and of one (24 in 3: a tile of 2 blocks spans two groups)
    "3x3_s2_grouped3_c48_oc48_blocked": (2, 48, 11, 13, 48, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), False, "relu", True),
    "3x3_s2_grouped3_c24_oc24_blocked": (1, 24, 9, 10, 24, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), False, None, False),
}
GROUPS = {"3x3_grouped2_c32_oc16_blocked": 2, "3x3_s2_grouped3_c48_oc48_blocked": 3, "3x3_s2_grouped3_c24_oc24_blocked": 3}
TILE_SPECS.update(BLOCKED_SPECS)


def _to_blocked(a, v=8, fill=0.0):
    """[N, C, H, W] -> [N, ceil(C/v), H, W, v]; the last block's padding lanes hold `fill`."""
    n, c, h, w = a.shape
    cb = -(-c // v)
    a = np.concatenate([a, np.full((n, cb * v - c, h, w), fill, a.dtype)], axis=1)
    return np.ascontiguousarray(a.reshape(n, cb, v, h, w).transpose(0, 1, 3, 4, 2))


def _conv_case(fields, groups=1, seed=0):
    """Random input, weights, bias, residual for ConvSpec `fields` and torch's result."""
    n, c, h, w, oc, kh, kw, stride, pad, dil, dw, act, res = fields
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((oc, 1 if dw else c // groups, kh, kw)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    xt = torch.nn.functional.pad(torch.from_numpy(x), (pad[1], pad[3], pad[0], pad[2]))
    ref = torch.nn.functional.conv2d(xt, torch.from_numpy(wt), torch.from_numpy(b), stride, 0, dil,
                                     oc if dw else groups)
    r = rng.standard_normal(tuple(ref.shape)).astype(np.float32)
    if res:
        ref = ref + torch.from_numpy(r)
    if act == "relu":
        ref = torch.relu(ref)
    elif act:
        ref = torch.clamp(ref, 0.0, 6.0)
    return x, wt, b, r, ref.numpy()


def _kernel_error(spec, case, target=AVX2, fill=7.0):
    """Relative max error of the kernel built for `spec` on `case` (inputs given NCHW; a blocked
    input's padding lanes hold `fill`)."""
    import tvm

    from shave.backends.tvm.schedules.conv import build_primfunc, pack_weight

    x, wt, b, r, ref = case
    if spec.in_blocked:  # padding lanes of a last block that is not full: finite values no output reads
        x = _to_blocked(x, spec.vec, fill=fill)
    if spec.res_blocked:
        r = _to_blocked(r, spec.vec, fill=7.0)
    lib = tvm.compile(tvm.IRModule({"main": build_primfunc(spec)}), target=tvm.target.Target(target))
    b = np.concatenate([b, np.zeros(spec.bias_len - b.size, np.float32)])
    args = [x, pack_weight(spec, wt), b] + ([r] if spec.residual else []) + [np.zeros(spec.out_shape(), np.float32)]
    bufs = [tvm.runtime.tensor(a, tvm.cpu()) for a in args]
    lib["main"](*bufs)
    out = bufs[-1].numpy()
    if spec.out_blocked:
        n, cb, oh, ow, v = out.shape
        out = out.transpose(0, 1, 4, 2, 3).reshape(n, cb * v, oh, ow)[:, :ref.shape[1]]
    return np.abs(out - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("target,c,k", [(AVX2, 13, 1), (AVX2, 58, 3), (AVX512, 24, 1), (AVX512, 40, 3)],
                         ids=["avx2-1x1-c13", "avx2-3x3-c58", "avx512-1x1-c24", "avx512-3x3-c40"])
def test_ragged_channel_reduction_reads_only_the_real_channels(target, c, k):
    """A dense conv whose input channels are not a multiple of the lanes reduces over the channels
    themselves, not whole blocks (ragged_reduction): the reduction's channel loop has extent C, and
    NaN in the blocked input's padding lanes (which whole blocks multiplied by zero weights, giving
    NaN) leaves the output exact. Built for both vector widths; run where the host can."""
    import tvm

    from shave.backends.tvm.schedules.conv import ConvSpec, compute_primfunc, ragged_reduction

    lanes = isa(target).fp32_lanes
    fields = (2, c, 9, 11, 24, k, k, (1, 1), (k // 2,) * 4, (1, 1), False, "relu", False)
    spec = ConvSpec(*fields, vec=lanes, regs=isa(target).vector_registers, in_blocked=True, out_blocked=True)
    assert c % lanes and ragged_reduction(spec)
    sch = tvm.s_tir.Schedule(compute_primfunc(spec))
    extents = [int(sch.get(lp).extent) for lp in sch.get_loops(sch.get_sblock("conv"))]
    assert extents[5] == c, extents  # b, o, y, x, j, then the channel axis (not ceil(c / lanes) * lanes)
    # channels that fill whole blocks keep the two block axes
    whole = dataclasses.replace(spec, c=2 * lanes)
    assert not ragged_reduction(whole)
    if runs_here(target):
        assert _kernel_error(spec, _conv_case(fields), target, fill=np.nan) <= TOL


@pytest.mark.parametrize("name", sorted(TILE_SPECS))
def test_every_candidate_tile_computes_the_conv(name):
    """Tuning may pick any tile of candidate_tiles: each must give the same result."""
    from shave.backends.tvm.schedules.conv import ConvSpec, candidate_tiles

    fields = TILE_SPECS[name]
    groups = GROUPS.get(name, 1)
    base = ConvSpec(*fields, vec=8, groups=groups)
    case = _conv_case(fields, groups)
    tiles = candidate_tiles(base)
    assert len(tiles) >= 2 and len(set(tiles)) == len(tiles)
    blocked = name in BLOCKED_SPECS
    if "pad0" in name:
        from shave.backends.tvm.schedules.conv import reads_input_in_place

        assert reads_input_in_place(dataclasses.replace(base, in_blocked=True))
    for tile in tiles:
        spec = ConvSpec(*fields, vec=8, tile=tile, in_blocked=blocked, out_blocked=blocked, res_blocked=blocked,
                        groups=groups)
        assert _kernel_error(spec, case) <= TOL, tile


@pytest.mark.parametrize("name", ["1x1_flat_c24_oc24_7x7_blocked", "3x3_c16_oc24_w13_blocked", "1x1_s2_c32_oc16_blocked"])
def test_both_parallel_task_orders_compute_the_conv(name, monkeypatch):
    """Dense kernels order their parallel tasks pixels-major or channels-major (conv._pixels_major,
    by the weights' size and the memory traffic of each order): both orders give the same result."""
    from shave.backends.tvm.schedules import conv

    fields = TILE_SPECS[name]
    spec = conv.ConvSpec(*fields, vec=8, in_blocked=True, out_blocked=True, res_blocked=fields[-1])
    case = _conv_case(fields)
    for pixels_major in (False, True):
        monkeypatch.setattr(conv, "_pixels_major", lambda *a: pixels_major)
        assert _kernel_error(spec, case) <= TOL, pixels_major


# dense convs whose register tiles read more weights than K_BLOCK_MIN_WEIGHT_BYTES, so each
# parallel task runs its reduction in blocks (conv.k_blocks), on 8 and on 16 lanes
K_BLOCK_SPECS = {
    # 1x1 on the flat view (tasks: chunks of columns), a residual, tiles that do not divide 7*7
    "1x1_flat_c1024_oc48_7x7": (2, 1024, 7, 7, 48, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, "relu", True),
    # strided 1x1 (tasks: output rows)
    "1x1_s2_c1024_oc32_9x30": (1, 1024, 9, 30, 32, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), False, None, False),
    # 2x2 padded: reduction blocks of whole input blocks, each with its four taps
    "2x2_c256_oc32_9x13": (1, 256, 9, 13, 32, 2, 2, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", True),
}


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "nchw"])
@pytest.mark.parametrize("name", sorted(K_BLOCK_SPECS))
def test_reduction_blocks_compute_the_conv(name, blocked, target):
    """A task's reduction in blocks of input channels, each block over all the task's register
    tiles (the accumulators kept in a per-task buffer between blocks), gives the conv: built for
    both vector widths, run where the host can; the layers are ones that take reduction blocks."""
    import tvm

    from shave.backends.tvm.schedules import conv

    fields = K_BLOCK_SPECS[name]
    cpu = isa(target)
    spec = conv.ConvSpec(*fields, vec=cpu.fp32_lanes, regs=cpu.vector_registers, fma_pipes=cpu.fma_pipes,
                         in_blocked=blocked, out_blocked=blocked, res_blocked=blocked and fields[-1])
    view = conv.flat_view(spec)
    kb = conv.k_blocks(view, conv.plan(view))
    assert 0 < kb < conv.plan(view)["icb"]
    lib = tvm.compile(tvm.IRModule({"main": conv.build_primfunc(spec)}), target=tvm.target.Target(target))
    assert re.search(r"vfmadd\d+ps", asm_of(lib))
    if runs_here(target):
        assert _kernel_error(spec, _conv_case(fields), target) <= TOL


def test_reduction_blocks_by_the_weights_a_tile_reads():
    """Reduction blocks where a task's tiles read more than K_BLOCK_MIN_WEIGHT_BYTES of weights, of
    at most K_BLOCK_WEIGHT_BYTES that divide the reduction: ResNet-50's 1024 -> 256 1x1 conv (two
    16-lane output blocks: 128 KB) in blocks of 4 x 16 channels, 8 x 8 with AVX2's 4-block tile;
    none for its 256 -> 1024 (32 KB), a task of one tile, a ragged reduction, or where one input
    block's taps are past the block budget."""
    from shave.backends.tvm.schedules import conv

    def kb(c, oc, hw, lanes, regs, k=1, stride=1):
        spec = conv.flat_view(conv.ConvSpec(1, c, hw, hw, oc, k, k, (stride, stride), (k // 2,) * 4, (1, 1), False,
                                            None, False, lanes, regs=regs))
        return conv.k_blocks(spec, conv.plan(spec))

    assert kb(1024, 256, 14, 16, 32) == 4
    assert kb(2048, 512, 7, 16, 32) == 4
    assert kb(1024, 256, 14, 8, 16) == 8
    assert kb(256, 1024, 14, 16, 32) == 0
    assert kb(1000, 256, 14, 8, 16) == 5  # 125 blocks of 8 channels: blocks of 5 divide them, 8 would not
    assert kb(1000, 256, 14, 16, 32) == 0  # ragged: one loop over the channels
    assert kb(2048, 64, 1, 16, 32) == 0  # one column: one tile per task
    assert kb(256, 256, 14, 16, 32, k=3) == 0  # one input block's 3x3 taps: 18 KB, past the block budget
    assert kb(256, 256, 14, 8, 16, k=2) == 2  # 2x2 taps, AVX2's 4-block tile: 4 KB an input block
    assert kb(3, 64, 224, 16, 32, k=11, stride=4) == 0  # AlexNet's stem: 46 KB, but one input block


def test_flat_rows_split_into_chunks_of_at_least_32_columns():
    """A flat view's parallel tasks are chunks of whole tiles of 32-64 columns: where the tiles'
    count has no divisor that gives such chunks (Inception-v3's 17 x 17 = 289 columns in 58 tiles
    of 5: chunks of 10), the row is padded to whole chunks with the fewest extra tiles; rows with
    such a divisor, or of one chunk, keep their width."""
    from shave.backends.tvm.schedules import conv

    def chunks(ow, reg):
        p = {"reg_n": reg, "owp": -(-ow // reg) * reg}
        p["owp"] = conv.chunked_width(p)
        return p["owp"], conv._tiles_per_chunk(p) * reg

    assert chunks(289, 5) == (300, 60)
    assert chunks(73 * 73, 8) == (5344, 32)  # 667 tiles = 23 x 29: padded to 668, chunks of 4
    assert chunks(14 * 14, 7) == (196, 49)
    assert chunks(56 * 56, 8) == (3136, 64)
    assert chunks(40, 8) == (40, 40)  # one chunk
    spec = conv.flat_view(conv.ConvSpec(*TILE_SPECS["1x1_flat_c16_oc16_17x17_blocked"], vec=8))
    p = conv.plan(spec)
    assert p["owp"] > 290 and conv._tiles_per_chunk(p) * p["reg_n"] >= 32


def test_task_order_follows_the_memory_traffic():
    """Small weights: pixels-major. Large weights: the order that reads less from memory
    (ConvNeXt-T's 384 -> 1536 linear layer at batch 8 on 14 x 14: pixels-major; a 2048 -> 2048
    linear layer on 8 rows, one chunk of columns: channels-major, the weights read once)."""
    from shave.backends.tvm.schedules import conv

    def order(n, c, h, w, oc):
        spec = conv.flat_view(conv.ConvSpec(n, c, h, w, oc, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, None,
                                            False, 8, tile=(2, 4)))
        return conv._pixels_major(spec, conv.plan(spec))

    assert order(1, 256, 56, 56, 64)  # 64 KB of weights
    assert order(1, 384, 1, 8 * 14 * 14, 1536)  # a linear layer: 2.4 MB of weights, 25 chunks, 96 groups
    assert not order(1, 2048, 1, 8, 2048)  # 16 MB of weights, 8 columns: reading them per chunk is the most


def test_default_dense_tile_by_register_count():
    """The direct kernel's default register tile: 2 channel blocks with 16 registers; with 32, one
    block and up to 12 columns where a zmm FMA issues once a cycle (Zen 4), two blocks and up to
    8 columns where it issues twice (fewer loads per FMA, at most 16 accumulators); rows of under
    4 columns (a 1x1 map) and convs with one output block keep the rules for few columns / one block."""
    from shave.backends.tvm.schedules.conv import ConvSpec, default_tile

    pointwise = ConvSpec(1, 64, 56, 56, 128, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, "relu", False, 16)
    se = dataclasses.replace(pointwise, h=1, w=1)
    k3 = ConvSpec(1, 64, 7, 7, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", False, 16)
    for spec in (pointwise, se, k3):
        assert default_tile(spec)[0] == 2
    half = {"regs": 32, "fma_pipes": 1}
    assert default_tile(dataclasses.replace(pointwise, **half)) == (1, 8)  # 3136 = 392 x 8: no padded column
    assert default_tile(dataclasses.replace(k3, **half)) == (1, 7)
    assert default_tile(dataclasses.replace(se, **half)) == default_tile(se)
    full = {"regs": 32, "fma_pipes": 2}
    assert default_tile(dataclasses.replace(pointwise, **full)) == (2, 8)
    assert default_tile(dataclasses.replace(k3, **full)) == (2, 7)
    assert default_tile(dataclasses.replace(se, **full)) == default_tile(se)
    assert default_tile(dataclasses.replace(k3, oc=16, **full)) == (1, 7)  # one output block
    assert default_tile(dataclasses.replace(k3, oc=48, **full)) == (3, 4)  # 3 blocks: no empty fourth
    assert default_tile(dataclasses.replace(pointwise, h=54, w=54, **full)) == (2, 6)  # 2916 = 486 x 6, not 2 x 12
    # 16 registers: 4 blocks x 3 columns where there are 12 blocks or more and 4 input blocks;
    # otherwise at least 8 accumulators where the row allows (27 columns: 3 x 3, not 2 x 3), 3
    # blocks only where their width pads fewer columns than 2 blocks' (28 = 7 x 4)
    avx2 = ConvSpec(8, 64, 27, 27, 192, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), False, "relu", False, 8)
    assert default_tile(avx2) == (4, 3)
    assert default_tile(dataclasses.replace(avx2, h=28, w=28)) == (4, 3)
    assert default_tile(dataclasses.replace(avx2, c=24)) == (3, 3)  # 3 input blocks: too short a reduction
    assert default_tile(dataclasses.replace(avx2, oc=48)) == (3, 3)  # 6 blocks
    assert default_tile(dataclasses.replace(avx2, oc=48, h=28, w=28)) == (2, 4)
    assert default_tile(dataclasses.replace(avx2, oc=32)) == (2, 4)  # 4 blocks: a third would leave 2 empty
    assert default_tile(dataclasses.replace(avx2, oc=32, regs=32)) != (2, 4)  # the 32-register rules
    # an odd number of output blocks under 12: one block (MobileNetV3-Small's 16 -> 72 1x1 conv
    # on 56 x 56 at batch 8: 2 x 4 took 0.61-0.64 ms, 1 x 8 0.25)
    pointwise16 = dataclasses.replace(avx2, c=16, oc=72, h=56, w=56, kh=1, kw=1, pad=(0,) * 4)
    assert default_tile(pointwise16) == (1, 8)
    assert default_tile(dataclasses.replace(pointwise16, oc=64)) == (2, 4)
    assert default_tile(dataclasses.replace(pointwise16, oc=104))[0] == 2  # 13 blocks: one empty in 14
    for ow in range(8, 64):
        for oc in (48, 64, 192):
            ocb_in, reg_n = default_tile(dataclasses.replace(avx2, h=ow, w=ow, oc=oc))
            assert 8 <= ocb_in * reg_n <= 12, (ow, oc)


def test_default_tile_reads_an_unpadded_blocked_input_in_place():
    """Where the input is blocked and unpadded and the register-file rules pick a width that does
    not divide the row (Inception-v3's 35 -> 17 stride-2 convs: 2 x 6 on 18 columns), the default
    is one block x the whole row, which reads the input in place (no pack pass); a padded input,
    a width that divides the row, or a row longer than 3/4 of the registers keeps the rules."""
    from shave.backends.tvm.schedules.conv import ConvSpec, default_tile, reads_input_in_place

    # (registers, FMA pipes, lanes): default tiles on rows of 17, 23, 26 and 8 columns (inputs of
    # 35, 47, 53 and 17); 26 columns are more than 3/4 of 32 registers, 17 and 23 of 16
    expected = {(32, 2, 16): [(1, 17), (1, 23), (2, 7), (2, 8)], (32, 1, 16): [(1, 17), (1, 23), (1, 9), (1, 8)],
                (16, 2, 8): [(4, 3), (4, 3), (4, 3), (1, 8)]}
    for (regs, pipes, lanes), tiles in expected.items():
        spec = ConvSpec(1, 96, 35, 35, 96, 3, 3, (2, 2), (0, 0, 0, 0), (1, 1), False, "relu", False, lanes,
                        regs=regs, fma_pipes=pipes, in_blocked=True, out_blocked=True)
        assert [default_tile(dataclasses.replace(spec, h=h, w=h)) for h in (35, 47, 53, 17)] == tiles, (regs, pipes)
        assert reads_input_in_place(spec) == (regs == 32)
        padded = dataclasses.replace(spec, pad=(1, 1, 1, 1))  # 18 columns, a pack pass whatever the tile
        assert default_tile(padded)[1] < padded.ow and not reads_input_in_place(padded)


def _unrolled_loops_around_serial_loops(func) -> list[str]:
    """Unrolled loops of a scheduled PrimFunc's script that hold a serial loop (only a register
    tile, the innermost loops, should be unrolled)."""
    lines = func.script().splitlines()
    bad = []
    for i, line in enumerate(lines):
        if "in T.unroll(" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        for inner in lines[i + 1:]:
            if inner.strip() and len(inner) - len(inner.lstrip()) <= indent:
                break
            if re.search(r" in (range|T\.grid|T\.serial)\(", inner):
                bad.append(line.strip())
                break
    return bad


@pytest.mark.parametrize("tile", [(1, 8), (2, 4)])
@pytest.mark.parametrize("case", ["flat_1x1", "3x3", "3x3_nchw_out", "lane_groups"])
def test_only_the_register_tile_is_unrolled(case, tile):
    """A tile of one channel block has no channel-block loop in its output stage: the loops
    unrolled there are counted from the tile loop, so the tile loop itself (which holds the
    reduction) is never unrolled (it was: 8-14 copies of the kernel, 2-5x the build time)."""
    from shave.backends.tvm.schedules.conv import ConvSpec, default_schedule

    spec = {"flat_1x1": ConvSpec(1, 32, 28, 28, 32, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, "relu", False, 16,
                                 in_blocked=True, out_blocked=True, regs=32),
            "3x3": ConvSpec(1, 32, 28, 28, 32, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), False, "relu", False, 16,
                            in_blocked=True, out_blocked=True, regs=32),
            "3x3_nchw_out": ConvSpec(1, 32, 28, 28, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", False,
                                     16, in_blocked=True, regs=32),
            "lane_groups": ConvSpec(1, 32, 28, 28, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", False, 16,
                                    groups=8, kernel="lane_groups", in_blocked=True, out_blocked=True, regs=32)}[case]
    func = default_schedule(dataclasses.replace(spec, tile=tile)).mod["main"]
    assert "T.unroll(" in func.script()
    assert _unrolled_loops_around_serial_loops(func) == []


def test_flat_view_of_pointwise_convs():
    """1x1 stride-1 unpadded convs run on the 1 x H*W view, with the spec's own tensor shapes
    in the kernel's signature; other convs are left as they are."""
    from shave.backends.tvm.schedules.conv import ConvSpec, build_primfunc, default_tile, flat_view

    spec = ConvSpec(2, 24, 7, 7, 24, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, None, True, 8,
                    in_blocked=True, out_blocked=True)
    view = flat_view(spec)
    assert (view.h, view.w, view.oh, view.ow) == (1, 49, 1, 49)
    assert default_tile(spec)[0] == 3  # 3 output blocks: no fourth, empty one
    f = build_primfunc(spec)
    shapes = [tuple(int(d) for d in p.shape) for p in f.params]
    assert shapes[0] == spec.in_shape() and shapes[3] == spec.out_shape(False) and shapes[-1] == spec.out_shape()
    for other in (dataclasses.replace(spec, stride=(2, 2)), dataclasses.replace(spec, pad=(1, 1, 1, 1)),
                  dataclasses.replace(spec, kh=3, kw=3), dataclasses.replace(spec, depthwise=True)):
        assert flat_view(other) is other


WINOGRAD_SPECS = {
    # name: (ConvSpec fields as TILE_SPECS, (in_blocked, out_blocked, res_blocked))
    # channels not multiples of 8, odd sizes (partial 2x2 tiles), NCHW in and out
    "c5_oc13_h11_w9_relu": ((1, 5, 11, 9, 13, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", False),
                            (False, False, False)),
    "c16_oc24_h9_w13_residual_blocked": ((2, 16, 9, 13, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", True),
                                         (True, True, True)),
    "c24_oc16_h10_w7_pad0_nchw_to_blocked": ((1, 24, 10, 7, 16, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), False, None,
                                              False), (False, True, False)),
    "c16_oc16_h7_w7_blocked_to_nchw_relu6": ((1, 16, 7, 7, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False,
                                              "clip:0.0:6.0", True), (True, False, True)),
    "c9_oc9_h5_w6_asym_pad_residual_nchw": ((1, 9, 5, 6, 9, 3, 3, (1, 1), (0, 1, 2, 1), (1, 1), False, "relu", True),
                                            (False, False, False)),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "staged"])
@pytest.mark.parametrize("name", sorted(WINOGRAD_SPECS))
def test_winograd_kernel_matches_torch(name, fused, monkeypatch):
    from shave.backends.tvm.schedules import winograd
    from shave.backends.tvm.schedules.conv import ConvSpec

    monkeypatch.setattr(winograd, "FUSED_WEIGHT_BYTES", 1 << 40 if fused else 0)
    fields, (ib, ob, rb) = WINOGRAD_SPECS[name]
    spec = ConvSpec(*fields, vec=8, in_blocked=ib, out_blocked=ob, res_blocked=rb and fields[-1], kernel="winograd")
    assert winograd.plan(spec)["fused"] == fused
    assert _kernel_error(spec, _conv_case(fields)) <= TOL


def test_every_winograd_tile_computes_the_conv():
    from shave.backends.tvm.schedules.conv import ConvSpec, candidate_tiles

    fields = (1, 16, 9, 13, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", True)
    base = ConvSpec(*fields, vec=8, kernel="winograd")
    case = _conv_case(fields)
    tiles = candidate_tiles(base)
    assert len(tiles) >= 3 and len(set(tiles)) == len(tiles)
    for tile in tiles[1:]:
        assert _kernel_error(dataclasses.replace(base, tile=tile), case) <= TOL, tile


def test_winograd_rule():
    from shave.backends.tvm.schedules.conv import ConvSpec
    from shave.backends.tvm.schedules.winograd import use_winograd

    def spec(c=64, oc=64, k=3, stride=1, dilation=1, depthwise=False, groups=1, hw=56):
        return ConvSpec(1, c, hw, hw, oc, k, k, (stride, stride), (k // 2,) * 4, (dilation, dilation), depthwise,
                        "relu", False, 8, groups=groups)

    assert use_winograd(spec())  # ResNet-18's 3x3 layers
    assert use_winograd(spec(512, 512, hw=7))
    assert not use_winograd(spec(stride=2))
    assert not use_winograd(spec(k=1))
    assert not use_winograd(spec(depthwise=True))
    assert not use_winograd(spec(groups=2))
    assert not use_winograd(spec(dilation=2))
    assert not use_winograd(spec(c=8, oc=8))  # few channels: the transforms outweigh the saved multiplies


class WinogradNet(nn.Module):
    """A Winograd layer (3x3, 32 channels, residual) between a stride-2 conv and a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 32, 3, 2, 1)
        self.body = nn.Conv2d(32, 32, 3, 1, 1)
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        y = torch.relu(self.down(x))
        return self.head(torch.relu(self.body(y) + y))


def test_rewrite_picks_winograd_by_the_rule():
    torch.manual_seed(0)
    model, x = WinogradNet().eval(), torch.randn(1, 3, 19, 17)
    algo = {(s.c, s.oc, s.kh, s.stride): (s.kernel == "winograd", s.in_blocked, s.out_blocked) for s in _kernel_specs(model, x)}
    assert algo[(32, 32, 3, (1, 1))] == (True, True, True)
    assert algo[(3, 32, 3, (2, 2))][0] is False
    assert algo[(32, 8, 1, (1, 1))][0] is False
    _check(model, x)


def test_narrow_groups_merge_into_whole_vector_blocks():
    from shave.backends.tvm.schedules.fusion import kernel_groups, merge_groups

    assert kernel_groups(16, 16, 4, 8) == 2
    assert kernel_groups(12, 24, 12, 8) == 3
    assert kernel_groups(6, 12, 3, 8) == 1
    assert kernel_groups(128, 128, 32, 8) == 16  # ResNeXt 32x4d: pairs of groups
    assert kernel_groups(64, 64, 2, 8) == 2
    w = np.arange(4 * 1 * 1 * 1, dtype=np.float32).reshape(4, 1, 1, 1) + 1  # 4 groups of 1 -> 2 of 2
    merged = merge_groups(w, 4, 2)[:, :, 0, 0]
    assert merged.tolist() == [[1, 0], [0, 2], [3, 0], [0, 4]]


def test_groups_narrower_than_a_vector_take_half_width_vectors():
    """Merging 8-channel groups into 16-lane blocks would compute the conv densely (RegNetY's 104
    channels in 13 groups: 13x its work): on AVX-512 such a conv runs at 8 lanes, groups as they
    are. Where merging costs at most twice the work (ResNeXt's 4-channel groups), full width stays."""
    from shave.backends.tvm.schedules.fusion import grouped_lanes

    assert grouped_lanes(104, 104, 13, 16) == (8, 13)  # RegNetY-400MF, 8-channel groups
    assert grouped_lanes(440, 440, 55, 16) == (8, 55)
    assert grouped_lanes(104, 104, 13, 8) == (8, 13)  # AVX2: the groups fit as they are
    assert grouped_lanes(128, 128, 32, 16) == (16, 8)  # ResNeXt 32x4d: 4 groups per block, 4x the work...
    assert grouped_lanes(128, 128, 32, 8) == (8, 16)  # ...against 2x at 8 lanes: not worth half the lanes
    assert grouped_lanes(64, 64, 8, 16) == (16, 4)  # pairs of 8-channel groups per block: 2x, full width kept
    assert grouped_lanes(40, 40, 5, 16) == (8, 5)  # 5 groups of 8: one dense conv (5x) against exact at 8 lanes
    assert grouped_lanes(64, 64, 2, 16) == (16, 2)
    assert grouped_lanes(48, 48, 12, 4) == (4, 12)  # NEON: no narrower vectors


class NarrowGroups(nn.Module):
    """A RegNetY-like block: 1x1 conv, 3x3 conv in `width`-channel groups, SE gate, 1x1 conv, residual."""

    def __init__(self, c=40, width=8):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c // width), nn.ReLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 10, 1), nn.ReLU(), nn.Conv2d(10, c, 1),
                                nn.Sigmoid())
        self.c = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.b(self.a(x))
        return torch.relu(x + self.c(y * self.se(y)))


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_narrow_groups_run_group_by_group_in_the_blocked_chain(target):
    """A grouped conv whose groups (as many input as output channels) are narrower than a vector
    takes the lane-groups kernel at full width, groups as they are, and stays in the blocked
    chain with its neighbours (40 channels: a last block with padding lanes on both targets);
    the model computes the block."""
    import tvm

    torch.manual_seed(0)
    width = 8 if isa(target).fp32_lanes == 16 else 4  # 8-channel groups on AVX-512 (RegNetY), 4 on AVX2
    model, x = NarrowGroups(width=width).eval(), torch.randn(1, 40, 10, 9)
    kernels = {}
    with tvm.target.Target(target):
        schedule_module(to_relax(shave.capture(model, (x,)), target, kernels), target)
    grouped = [s for s in kernels if s.groups > 1]
    assert [(s.kernel, s.vec, s.groups, s.in_blocked, s.out_blocked) for s in grouped] == \
        [("lane_groups", isa(target).fp32_lanes, 40 // width, True, True)]
    if runs_here(target):
        with torch.no_grad():
            ref = model(x).numpy()
        cm = shave.compile(model, (x,), target=target, passes=[])
        assert np.abs(cm(x.numpy()) - ref).max() / np.abs(ref).max() <= TOL


def test_dense_conv_with_few_output_channels_runs_on_narrower_vectors():
    """A dense conv whose output channels fill at most half a vector runs on the narrowest width
    that holds them (LeNet-5's 6-channel conv: 8 lanes on AVX-512), NCHW in and out; built for
    AVX2, a 3-channel conv runs on 4 lanes, which every x86 host runs, and computes the conv."""
    import tvm

    from shave.backends.tvm.schedules.fusion import narrow_lanes

    assert [narrow_lanes(oc, v) for oc, v in [(6, 16), (3, 16), (8, 16), (9, 16), (6, 8), (3, 8), (1, 4)]] == \
        [8, 4, 8, 16, 8, 4, 4]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(3, 16, 1)).eval()
    x = torch.randn(2, 4, 12, 11)
    for target, lanes in ((AVX2, 4), (AVX512, 4)):
        kernels = {}
        with tvm.target.Target(target):
            schedule_module(to_relax(shave.capture(model, (x,)), target, kernels), target)
        (narrow,) = [s for s in kernels if s.oc == 3]
        assert narrow.vec == lanes and not (narrow.in_blocked or narrow.out_blocked)
    with torch.no_grad():
        ref = model(x).numpy()
    cm = shave.compile(model, (x,), target=AVX2, passes=[])
    assert np.abs(cm(x.numpy()) - ref).max() / np.abs(ref).max() <= TOL


def test_half_width_grouped_kernel_computes_the_conv():
    """The half-width path built for AVX2, which every x86 host runs: 5 groups of 8 input and 4
    output channels (not the lane-groups kernel's: it needs as many of each), merged at 8 lanes
    one dense conv (5x the work), run on 4-lane vectors, NCHW in and out."""
    import tvm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 40, 1), nn.ReLU(), nn.Conv2d(40, 20, 3, 1, 1, groups=5), nn.ReLU(),
                          nn.Conv2d(20, 16, 1)).eval()
    x = torch.randn(1, 16, 10, 9)
    kernels = {}
    with tvm.target.Target(AVX2):
        schedule_module(to_relax(shave.capture(model, (x,)), AVX2, kernels), AVX2)
    grouped = [s for s in kernels if s.groups > 1]
    assert [(s.kernel, s.vec, s.groups, s.in_blocked, s.out_blocked) for s in grouped] == \
        [("direct", 4, 5, False, False)]
    with torch.no_grad():
        ref = model(x).numpy()
    cm = shave.compile(model, (x,), target=AVX2, passes=[])
    assert np.abs(cm(x.numpy()) - ref).max() / np.abs(ref).max() <= TOL


# grouped convs for the lane-groups kernel: ConvSpec fields (as TILE_SPECS), groups
LANE_GROUP_SPECS = {
    # ResNeXt-like 4-channel groups with a residual, batch 2; 72 channels: 9 blocks of 8 (tiles of 2
    # blocks compute a tenth, which reads the last input block times zero weights), 5 of 16 (ragged)
    "4ch_res_b2": ((2, 72, 9, 13, 72, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", True), 18),
    # 2-channel groups, stride 2, 24 channels (ragged at 16 lanes)
    "2ch_s2": ((1, 24, 11, 10, 24, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), False, None, False), 12),
    # a one-row output: the parallel tasks are chunks of tiles along the row (conv.parallel_tasks)
    "4ch_row": ((2, 32, 1, 70, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", False), 8),
    # RegNet-like 8-channel groups (16 lanes only), dilated, 40 channels (ragged)
    "8ch_dil2": ((1, 40, 7, 9, 40, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), False, "clip:0.0:6.0", False), 5),
}


@pytest.mark.parametrize("isa_name", sorted(FP32_ISAS))
@pytest.mark.parametrize("name", sorted(LANE_GROUP_SPECS))
def test_lane_groups_kernel_computes_the_conv(isa_name, name):
    """The lane-groups kernel (lane_groups.py) for each ISA, whatever the host: it takes the groups
    narrower than a vector that divide it; it is built with vector FMAs and in-register shuffles and no
    element-by-element gathers (a lane-dependent read vectorised naively is vpextrd / vinsertps);
    where the host runs the code, every candidate tile, NCHW and blocked, matches torch."""
    import tvm

    from shave.backends.tvm.schedules import lane_groups
    from shave.backends.tvm.schedules.conv import ConvSpec, build_primfunc, candidate_tiles

    target, lanes, fma = FP32_ISAS[isa_name]
    fields, groups = LANE_GROUP_SPECS[name]
    cg = fields[1] // groups
    spec = ConvSpec(*fields, vec=lanes, groups=groups, regs=isa(target).vector_registers, kernel="lane_groups")
    assert lane_groups.supports(spec) == (cg < lanes)
    if cg >= lanes:
        return
    blocked = dataclasses.replace(spec, in_blocked=True, out_blocked=True, res_blocked=spec.residual)
    asm = asm_of(tvm.compile(tvm.IRModule({"main": build_primfunc(blocked)}), target=tvm.target.Target(target)))
    assert re.search(fma, asm), f"no {isa_name} vector FMA in the kernel"
    if isa_name != "neon":
        # shuffles: vpermilps / vshufps / vpermps, or vmovsldup / vmovshdup for 2-channel groups
        assert re.search(r"vperm|vshuf|vmovs[lh]dup", asm) and not re.search(r"vpextrd|vinsertps|vgather", asm)
    if not runs_here(target):
        return
    case = _conv_case(fields, groups)
    tiles = candidate_tiles(spec)
    assert len(tiles) >= 2
    for tile in tiles:
        for layout in (spec, blocked):
            s = dataclasses.replace(layout, tile=tile)
            assert _kernel_error(s, case, target) <= TOL, (tile, s.in_blocked)


@pytest.mark.parametrize("fields", [
    (1, 144, 28, 28, 144, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), True, "clip:0.0:6.0", False),  # depthwise
    (1, 96, 28, 28, 96, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), True, "clip:0.0:6.0", False),  # depthwise s2
    (1, 32, 14, 14, 48, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), False, "relu", False),  # dense direct
    (1, 96, 14, 14, 24, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, None, True),  # 1x1 flat, residual
], ids=["dw", "dw_s2", "dense_s2", "1x1_flat"])
def test_no_workspace_allocation_inside_the_parallel_loop(fields):
    """Per-tile buffers (accumulator, depthwise input patch) must be stack arrays: TVM makes any
    other buffer a TVMBackendAllocWorkspace/FreeWorkspace pair where it is allocated, which
    inside the parallel loop ran per row or tile and cost about 8 % of MobileNetV2's time."""
    import tvm

    from shave.backends.tvm.schedules.conv import ConvSpec, build_primfunc

    spec = ConvSpec(*fields, vec=8, in_blocked=True, out_blocked=True, res_blocked=fields[-1])
    ex = tvm.compile(tvm.IRModule({"main": build_primfunc(spec)}), target=tvm.target.Target(AVX2))
    assert workspace_calls_in_parallel_loops(ex) == 0


@pytest.mark.parametrize("lanes", [8, 16])
def test_grouped_conv_packs_its_input_per_parallel_task(lanes):
    """A strided grouped conv (blocked input) packs the input rows of each parallel task inside that
    task, not the whole padded input in a pass of its own as a dense or stride-1 conv does: one
    workspace call per task (the patch is over STACK_BYTES), none per register tile."""
    import tvm

    from shave.backends.tvm.schedules.conv import ConvSpec, build_primfunc, default_schedule

    target = AVX2 if lanes == 8 else AVX512
    grouped = ConvSpec(1, 64, 28, 28, 64, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), False, "relu", False, lanes,
                       in_blocked=True, out_blocked=True, groups=64 // 16, regs=isa(target).vector_registers)

    def packed_in_task(spec):
        sch = default_schedule(spec)
        pack, conv = (sch.get_loops(sch.get_sblock(b)) for b in ("pack", "conv_update"))
        assert sch.get(conv[0]).kind == tvm.tirx.ForKind.PARALLEL
        return sch.get(pack[0]).same_as(sch.get(conv[0])) and not sch.get(pack[1]).same_as(sch.get(conv[1]))

    assert packed_in_task(grouped)
    assert not packed_in_task(dataclasses.replace(grouped, groups=1))  # dense: one pass over the input first
    assert not packed_in_task(dataclasses.replace(grouped, stride=(1, 1)))  # stride 1: each row read by 3 tasks
    ex = tvm.compile(tvm.IRModule({"main": build_primfunc(grouped)}), target=tvm.target.Target(target))
    assert workspace_calls_in_parallel_loops(ex) == 1


class Reductions(nn.Module):
    """Global pools and means over maps whose sizes are and are not multiples of the vector width,
    and a softmax over 1000 classes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 1000)

    def forward(self, x):
        pooled = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # 16 x 12 = 192 values per channel
        mean = x[:, :, :7, :7].mean((2, 3))  # 49 values: not vectorised
        return torch.cat([torch.softmax(self.fc(torch.cat([pooled, mean], 1)), 1), x.amax((2, 3))], 1)


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_reductions_vectorised_by_partial_sums(target):
    """A reduction over a multiple of the vector width becomes partial sums in vector lanes
    (an rfactor block); results match PyTorch."""
    import tvm

    torch.manual_seed(0)
    model, x = Reductions().eval(), torch.randn(2, 16, 16, 12)
    with tvm.target.Target(target):
        mod = schedule_module(to_relax(shave.capture(model, (x,)), target), target)
    scripts = {gv.name_hint: f.script() for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    pools = [s for n, s in scripts.items() if "adaptive_avg_pool2d" in n]
    assert pools and all("_rf" in s and "T.vectorized" in s for s in pools), list(scripts)
    if runs_here(target):
        _check(model, x)


@pytest.mark.parametrize("isa_name", sorted(FP32_ISAS))
@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
def test_batched_matmul_kernel_for_each_isa(isa_name, trans_b):
    """Attention's matmul kernel (schedules/matmul.py) on odd sizes (rows and columns that fill no
    whole tile): built for every ISA with its vector FMAs, run against numpy where the host can."""
    import tvm

    from shave.backends.tvm.schedules.matmul import build_primfunc, tile

    target, lanes, fma = FP32_ISAS[isa_name]
    batch, m, n, k = 3, 13, 21, 10
    func = build_primfunc(batch, m, n, k, trans_b=trans_b, scale=0.25, lanes=lanes,
                          regs=isa(target).vector_registers)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target(target))
    assert re.search(fma, asm_of(lib)), f"no {isa_name} vector FMA in the kernel"
    rows, cols = tile(m, n, lanes, isa(target).vector_registers)
    assert rows * cols + cols + 1 <= isa(target).vector_registers
    if runs_here(target):
        rng = np.random.default_rng(0)
        a = rng.standard_normal((batch, m, k)).astype(np.float32)
        b = rng.standard_normal((batch, n, k) if trans_b else (batch, k, n)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((batch, m, n), np.float32))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
        ref = 0.25 * (a @ (b.transpose(0, 2, 1) if trans_b else b))
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_attention_softmax_kernel():
    """The softmax kernel between attention's matmuls (schedules/matmul.py): rows of whole vectors,
    the padding columns (-3.4e38) get 0, large and small logits as torch, a NaN spoils its row only."""
    import tvm

    from shave.backends.tvm.schedules.matmul import softmax_primfunc

    rows, n, valid = 7, 24, 21
    x = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32) * 30
    x[1] += 1e4
    x[2, 3] = np.nan
    x[:, valid:] = -3.4e38
    lib = tvm.compile(tvm.IRModule({"main": softmax_primfunc(rows, n, 8).with_attr("global_symbol", "main")}),
                      target=tvm.target.Target(AVX2))
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), out)
    got, ref = out.numpy(), torch.softmax(torch.from_numpy(x[:, :valid]), -1).numpy()
    assert np.isnan(got[2]).all() and np.isnan(ref[2]).all()
    keep = [r for r in range(rows) if r != 2]
    np.testing.assert_allclose(got[keep, :valid], ref[keep], rtol=1e-5, atol=1e-7)
    assert np.abs(got[keep, valid:]).max() < 1e-30


def test_a_conv_kernel_that_fails_to_build_is_named_in_a_warning(monkeypatch, caplog):
    """A conv kernel that fails to build leaves its layer to TVM's generic conv, which is correct
    but much slower: the compile says so, naming the node and the error, instead of passing it
    silently (a bug in a kernel's plan once made AlexNet's stem 60x slower unnoticed)."""
    import logging

    from shave.backends.tvm.schedules import fusion

    real = fusion.build_primfunc

    def failing(spec):
        if spec.kh == 5:
            raise ValueError("planned to fail")
        return real(spec)

    monkeypatch.setattr(fusion, "build_primfunc", failing)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 5, padding=2)).eval()
    x = torch.randn(1, 3, 12, 12)
    with caplog.at_level(logging.WARNING, logger="shave.backends.tvm.schedules.fusion"):
        cm = shave.compile(m, (x,))
    torch.testing.assert_close(cm(x), m(x), rtol=1e-4, atol=1e-5)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["conv kernel for node '2' not built (ValueError: planned to fail); TVM's generic conv "
                    "computes it, slower"]  # node '2': the Sequential's 5x5 conv
