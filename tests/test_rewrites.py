"""Shift and channel_shuffle ops; ShiftRewrite, GroupRewrite and DepthwiseSeparable passes."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shave
from conftest import rel_err
from shave.reference import run_graph
from shave.errors import IRError
from shave.ir import Graph, Node, infer_types, load_graph, save_graph, verify
from shave.ir.opset_rewrites import shuffle_indices
from shave.ir.types import TensorType


def _graph(shape, nodes, params=None, outputs=None):
    g = Graph(inputs=[("x", TensorType(shape, "float32"))])
    for k, v in (params or {}).items():
        g.set_param(k, np.asarray(v, np.float32))
    g.nodes = [Node(name, op, ins, attrs) for name, op, ins, attrs in nodes]
    g.outputs = outputs or [g.nodes[-1].name]
    return verify(infer_types(g))


def _shift_loops(x, shifts):
    """Plain-loop reference: out[n, c, h, w] = x[n, c, h - dy, w - dx], zero outside."""
    out = np.zeros_like(x)
    _, c, h, w = x.shape
    for ch, (dy, dx) in enumerate(shifts):
        for i in range(h):
            for j in range(w):
                if 0 <= i - dy < h and 0 <= j - dx < w:
                    out[:, ch, i, j] = x[:, ch, i - dy, j - dx]
    return out


def _conv_attrs(stride=1, padding=0, groups=1):
    return {"stride": (stride, stride), "padding": (padding, padding), "dilation": (1, 1), "groups": groups}


# ------------------------------------------------------------------------------------------------ ops
def test_shift_matches_loops_with_zero_fill(rng):
    shifts = ((1, 0), (0, -2), (0, 0), (-1, 1), (5, 0), (2, -7))  # the last two shift everything out
    x = rng.standard_normal((2, 6, 5, 7)).astype(np.float32)
    g = _graph(x.shape, [("s", "shift", ["x"], {"shifts": shifts})])
    out = run_graph(g, [x])[0]
    ref = _shift_loops(x, shifts)
    assert np.array_equal(out, ref)
    assert not out[:, 4].any() and not out[:, 5].any() and out[:, 0, 0].sum() == 0
    assert g.stats()["flops"] == 0


def test_channel_shuffle_matches_torch_and_its_permutation(rng):
    x = rng.standard_normal((2, 12, 3, 4)).astype(np.float32)
    g = _graph(x.shape, [("cs", "channel_shuffle", ["x"], {"groups": 3})])
    out = run_graph(g, [x])[0]
    assert np.array_equal(out, F.channel_shuffle(torch.from_numpy(x), 3).numpy())
    assert np.array_equal(out, x[:, list(shuffle_indices(12, 3))])
    assert not np.array_equal(out, x)


@pytest.mark.parametrize("op,attrs,msg", [
    ("shift", {"shifts": ((0, 0),) * 3}, "3 (dy, dx) pairs for the 4 channels"),
    ("shift", {"shifts": ((0, 0),) * 3 + ((0, 0.5),)}, "pair of ints"),
    ("channel_shuffle", {"groups": 3}, "groups=3 must be a positive divisor of the 4 channels"),
])
def test_bad_attributes_are_one_line_errors_naming_the_node(op, attrs, msg):
    g = Graph(inputs=[("x", TensorType((1, 4, 5, 5), "float32"))])
    g.nodes = [Node("bad", op, ["x"], attrs)]
    g.outputs = ["bad"]
    with pytest.raises(IRError) as e:
        verify(g)
    assert msg in str(e.value) and "'bad'" in str(e.value) and "\n" not in str(e.value)


def test_shift_attribute_round_trips(tmp_path, rng):
    shifts = tuple((int(a), int(b)) for a, b in rng.integers(-1, 2, (4, 2)))
    g = _graph((1, 4, 5, 5), [("s", "shift", ["x"], {"shifts": shifts}),
                              ("cs", "channel_shuffle", ["s"], {"groups": 2})])
    save_graph(g, tmp_path / "g")
    back = load_graph(tmp_path / "g")
    assert back.node("s").attrs["shifts"] == shifts
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    assert np.array_equal(run_graph(back, [x])[0], run_graph(g, [x])[0])


def _shift_net(rng, c=8, shuffle=True):
    """conv 3x3 -> relu -> shift -> 1x1 conv [-> channel_shuffle]: both ops between prunable layers."""
    shifts = tuple((int(a), int(b)) for a, b in rng.integers(-1, 2, (c, 2)))
    nodes = [("conv1", "conv2d", ["x", "w1", "b1"], _conv_attrs(padding=1)),
             ("r", "relu", ["conv1"], {}),
             ("s", "shift", ["r"], {"shifts": shifts}),
             ("conv2", "conv2d", ["s", "w2"], _conv_attrs())]
    if shuffle:
        nodes.append(("cs", "channel_shuffle", ["conv2"], {"groups": 2}))
    params = {"w1": rng.standard_normal((c, 3, 3, 3)), "b1": rng.standard_normal(c),
              "w2": rng.standard_normal((8, c, 1, 1))}
    return _graph((1, 3, 6, 6), nodes, params), shifts


def test_pruning_keeps_each_channels_own_shift(rng):
    g, shifts = _shift_net(rng)
    w1 = g.params["w1"]
    w1 = w1 * (1 + 3 * (np.arange(8) % 2 == 0))[:, None, None, None]  # odd filters are the weakest
    g.set_param("w1", w1.astype(np.float32))
    out = shave.passes.Prune(ratio=0.5, round_to=1)(g)
    kept = [int(np.flatnonzero(np.all(g.params["w1"] == row, axis=(1, 2, 3)))[0]) for row in out.params[
        out.node("conv1").inputs[1]]]
    assert kept == [0, 2, 4, 6]
    assert out.node("s").attrs["shifts"] == tuple(shifts[k] for k in kept)
    zeroed = g.copy()  # the same network with the pruned channels' filters and biases zeroed
    mask = np.isin(np.arange(8), kept)
    zeroed.set_param("w1", g.params["w1"] * mask[:, None, None, None])
    zeroed.set_param("b1", g.params["b1"] * mask)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    assert rel_err(run_graph(out, [x])[0], run_graph(zeroed, [x])[0]) < 1e-5


def test_pruning_through_a_shuffle_leaves_the_permutation(rng):
    g, _ = _shift_net(rng, shuffle=False)
    g.nodes.insert(2, Node("cs", "channel_shuffle", ["r"], {"groups": 2}))
    g.node("s").inputs = ["cs"]
    g = verify(infer_types(g))
    out = shave.passes.Prune(ratio=0.5, round_to=1)(g)
    assert out.node("cs").op == "channel_permute" and len(out.node("cs").attrs["indices"]) == 4
    kept = [int(np.flatnonzero(np.all(g.params["w1"] == row, axis=(1, 2, 3)))[0]) for row in out.params[
        out.node("conv1").inputs[1]]]
    mask = np.isin(np.arange(8), kept)
    zeroed = g.copy()
    zeroed.set_param("w1", g.params["w1"] * mask[:, None, None, None])
    zeroed.set_param("b1", g.params["b1"] * mask)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    assert rel_err(run_graph(out, [x])[0], run_graph(zeroed, [x])[0]) < 1e-5


# ----------------------------------------------------------------------------------------------- TVM
def _scheduled_calls(g, kernels=None):
    """The kernel calls of `g` built for the host; `kernels` (a dict) gets the conv kernels' specs."""
    import tvm

    from shave.backends.tvm.lower import to_relax
    from shave.backends.tvm.schedules import schedule_module
    from shave.target import resolve_target
    from shave.backends.tvm.tune import _count_calls

    target = resolve_target("x86")
    with tvm.target.Target(target):
        return _count_calls(schedule_module(to_relax(g, target, kernels), target))


@pytest.mark.parametrize("c", [12, 16])  # 16: the shift reads the previous conv's blocked output
def test_tvm_shift_folds_into_the_next_conv_and_matches_the_ir(rng, c):
    g, _ = _shift_net(rng, c=c)
    g.node("conv2").attrs = _conv_attrs(stride=2, padding=1)  # padding and stride around the folded shift
    g = verify(infer_types(g))
    calls = _scheduled_calls(g)
    assert not any(k.startswith("shave_shift") for k in calls) and sum(k.startswith("shave_conv") for k in calls) == 2
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    cm = shave.compile(g, (torch.from_numpy(x),), passes=[])
    assert rel_err(cm(x), run_graph(g, [x])[0]) < 1e-5


def test_tvm_shift_folds_into_a_lane_groups_conv(rng):
    """A shift feeding a grouped conv of 4-channel groups (the lane-groups kernel on every x86
    host: 8 or 16 lanes) folds into that kernel's pack stage and matches the IR."""
    c = 16
    shifts = tuple((int(a), int(b)) for a, b in rng.integers(-1, 2, (c, 2)))
    nodes = [("conv1", "conv2d", ["x", "w1", "b1"], _conv_attrs(padding=1)), ("r", "relu", ["conv1"], {}),
             ("s", "shift", ["r"], {"shifts": shifts}),
             ("conv2", "conv2d", ["s", "w2"], _conv_attrs(stride=2, padding=1, groups=4))]
    g = _graph((1, 3, 9, 8), nodes, {"w1": rng.standard_normal((c, 3, 3, 3)), "b1": rng.standard_normal(c),
                                     "w2": rng.standard_normal((c, 4, 3, 3))})
    kernels = {}
    calls = _scheduled_calls(g, kernels)
    assert not any(k.startswith("shave_shift") for k in calls) and sum(k.startswith("shave_conv") for k in calls) == 2
    assert [(s.kernel, s.shift) for s in kernels if s.groups > 1] == [("lane_groups", True)]
    x = rng.standard_normal((1, 3, 9, 8)).astype(np.float32)
    cm = shave.compile(g, (torch.from_numpy(x),), passes=[])
    assert rel_err(cm(x), run_graph(g, [x])[0]) < 1e-5


def test_tvm_standalone_shift_and_shuffle_match_the_ir(rng):
    shifts = ((1, 0), (0, -2), (0, 0), (-1, 1), (5, 0), (2, -7))
    g = _graph((1, 6, 5, 7), [("s", "shift", ["x"], {"shifts": shifts}), ("r", "relu", ["s"], {}),
                              ("cs", "channel_shuffle", ["x"], {"groups": 2})], outputs=["r", "s", "cs"])
    assert any(k.startswith("shave_shift") for k in _scheduled_calls(g))  # read twice: not folded
    x = rng.standard_normal((1, 6, 5, 7)).astype(np.float32)
    cm = shave.compile(g, (torch.from_numpy(x),), passes=[])
    for got, ref in zip(cm(x), run_graph(g, [x])):
        assert np.array_equal(got, ref)


# -------------------------------------------------------------------------------------------- passes
from shave.errors import PassError  # noqa: E402
from shave.passes import DepthwiseSeparable, FoldBN, GroupRewrite, ShiftRewrite, get_pass  # noqa: E402
from shave.passes.rewrites import balanced_blocks  # noqa: E402


class Block(nn.Module):
    """stride-2 3x3 -> BN -> relu -> 3x3 (dilated) -> BN, plus a 1x1 shortcut, residual add, relu."""

    def __init__(self, c=8, n=16):
        super().__init__()
        self.conv1 = nn.Conv2d(c, n, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(n)
        self.conv2 = nn.Conv2d(n, n, 3, padding=2, dilation=2)
        self.bn2 = nn.BatchNorm2d(n)
        self.short = nn.Conv2d(c, n, 1, stride=2)
        self.conv3 = nn.Conv2d(n, n, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.conv3(torch.relu(self.bn2(self.conv2(y)) + self.short(x)))


@pytest.fixture(scope="module")
def block_graph():
    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 9, 9)
    return shave.capture(m, (x,)), x.numpy()


def _with_weight(g, name, w):
    g = g.copy()
    g.set_param(g.node(name).inputs[1], w.astype(np.float32))
    return g


def test_shift_rewrite_is_exact_for_one_hot_kernels_with_stride_and_dilation(block_graph, rng):
    g, x = block_graph
    for name in ("conv1", "conv2"):  # each input channel uses one kernel position (its own)
        w = np.asarray(g.params[g.node(name).inputs[1]])
        pos = rng.integers(0, 9, w.shape[1])
        mask = np.zeros((w.shape[1], 9))
        mask[np.arange(w.shape[1]), pos] = 1
        g = _with_weight(g, name, w * mask.reshape(1, w.shape[1], 3, 3))
    p = ShiftRewrite(layers=["conv1", "conv2"])
    r = p.apply(g)
    out = r.graph
    assert out.op_counts()["shift"] == 2 and rel_err(run_graph(out, [x])[0], run_graph(g, [x])[0]) < 1e-5
    assert all(e.kept and e.kernel_error < 1e-6 for e in r.plan)
    assert out.stats()["flops"] < g.stats()["flops"]


def test_shift_rewrite_replicating_every_position_is_exact_and_lossy_otherwise(block_graph):
    g, x = block_graph
    ref = run_graph(g, [x])[0]
    exact = ShiftRewrite(replicate=9, layers="conv2")(g)
    assert rel_err(run_graph(exact, [x])[0], ref) < 1e-5
    errs = [rel_err(run_graph(ShiftRewrite(replicate=r, layers="conv2")(g), [x])[0], ref) for r in (1, 4)]
    assert errs[0] > errs[1] > 1e-3


def test_shift_rewrite_skips_what_it_cannot_do_with_a_reason(block_graph):
    g, _ = block_graph
    p = ShiftRewrite()
    r = p.apply(g)
    reasons = {e.name: e.reason for e in r.plan}
    assert reasons["short"] == "is already 1x1" and reasons["conv3"] == "is already 1x1"
    assert {e.name for e in r.plan if e.kept} == {"conv1", "conv2"}
    torch.manual_seed(0)
    valid = shave.capture(nn.Conv2d(4, 4, 3, padding=0), (torch.randn(1, 4, 6, 6),))
    with pytest.raises(PassError, match="shift_rewrite cannot apply to node 'conv2d': it has padding \\(0, 0\\)"):
        ShiftRewrite(layers="conv2d")(valid)


def _block_diagonal(rng, n, c, g, k=1):
    w = np.zeros((n, c, k, k))
    for b in range(g):
        w[b * n // g:(b + 1) * n // g, b * c // g:(b + 1) * c // g] = rng.standard_normal((n // g, c // g, k, k))
    rows, cols = rng.permutation(n), rng.permutation(c)
    return w[rows][:, cols]


def test_balanced_blocks_recovers_a_hidden_block_structure(rng):
    w = _block_diagonal(rng, 24, 16, 4)
    rows, cols = balanced_blocks((w ** 2).sum((2, 3)), 4)
    assert np.bincount(rows).tolist() == [6] * 4 and np.bincount(cols).tolist() == [4] * 4
    off = (w[:, :, 0, 0] ** 2)[rows[:, None] != cols[None, :]].sum()
    assert off == 0


def test_group_rewrite_of_permuted_block_diagonal_weights_is_exact_and_folds_permutations(block_graph, rng):
    g, x = block_graph
    g = _with_weight(g, "conv2", _block_diagonal(rng, 16, 16, 4, k=3))  # input: conv1 (+bn, relu), read once
    g = _with_weight(g, "conv3", _block_diagonal(rng, 16, 16, 4))  # output: the graph output
    p = GroupRewrite(groups=4, layers=["conv2", "conv3"])
    r = p.apply(g)
    out = r.graph
    assert rel_err(run_graph(out, [x])[0], run_graph(g, [x])[0]) < 1e-5
    assert all(e.kept and e.kernel_error < 1e-6 for e in r.plan)
    assert {n.attrs["groups"] for n in out.nodes if n.name.endswith(".grouped")} == {4}
    permutes = [n for n in out.nodes if n.op == "channel_permute"]
    # conv2: input order folded into conv1's filters; output goes into the residual add: one explicit permute.
    # conv3: input comes from the add (not foldable); output is the graph output (not foldable)
    assert sorted(n.name for n in permutes) == ["conv2.permute_out", "conv3.permute_in", "conv3.permute_out"]
    assert out.stats()["flops"] < g.stats()["flops"]
    folded = FoldBN()(out)  # the explicit permute sits after bn2, so bn2 still folds into the grouped conv
    assert "batch_norm" not in folded.op_counts()
    assert rel_err(run_graph(folded, [x])[0], run_graph(g, [x])[0]) < 1e-5


def test_group_rewrite_folds_its_output_order_into_the_next_conv(rng):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 8, 5, 5)
    g = shave.capture(m, (x,))
    first = [n.name for n in g.nodes if n.op == "conv2d"][0]
    g = _with_weight(g, first, _block_diagonal(rng, 8, 8, 2))
    out = GroupRewrite(groups=2, layers=first)(g)
    assert out.op_counts().get("channel_permute", 0) == 1  # the input side only (the graph input)
    assert rel_err(run_graph(out, [x.numpy()])[0], run_graph(g, [x.numpy()])[0]) < 1e-5


def test_depthwise_separable_is_exact_at_full_multiplier_and_for_rank_one_slices(block_graph, rng):
    g, x = block_graph
    ref = run_graph(g, [x])[0]
    out = DepthwiseSeparable(multiplier=9, layers=["conv1", "conv2"])(g)
    assert rel_err(run_graph(out, [x])[0], ref) < 1e-5
    w = np.einsum("co,ck->ock", rng.standard_normal((8, 16)), rng.standard_normal((8, 9))).reshape(16, 8, 3, 3)
    g1 = _with_weight(g, "conv1", w)  # every W[:, c] has rank 1
    p = DepthwiseSeparable(layers="conv1")
    r = p.apply(g1)
    out = r.graph
    assert rel_err(run_graph(out, [x])[0], run_graph(g1, [x])[0]) < 1e-5 and r.plan[0].kernel_error < 1e-6
    dw = out.node("conv1.depthwise")
    assert dw.attrs["groups"] == 8 and dw.attrs["stride"] == (2, 2)
    assert out.stats()["flops"] < g1.stats()["flops"]


@pytest.mark.parametrize("make", [lambda d: ShiftRewrite(data=d), lambda d: GroupRewrite(groups=2, data=d),
                                  lambda d: DepthwiseSeparable(data=d)])
def test_refit_lowers_every_layers_output_error_and_input_is_unchanged(block_graph, make):
    g, x = block_graph
    before = str(g)
    calib = [np.random.default_rng(i).standard_normal((4, 8, 9, 9)).astype(np.float32) for i in range(2)]
    p = make(calib)
    r = p.apply(g)
    out = r.graph
    kept = [e for e in r.plan if e.kept]
    assert kept and all(e.refit_error < e.output_error for e in kept), r.summary()
    plain = type(p)(**({"groups": 2} if isinstance(p, GroupRewrite) else {}))(g)
    xs = np.concatenate(calib)  # end to end, on the calibration data, the refit network is closer
    l2 = lambda a: np.linalg.norm(run_graph(a, [xs])[0] - run_graph(g, [xs])[0])  # noqa: E731
    assert l2(out) < l2(plain)
    assert str(g) == before
    assert "rewritten" in r.summary()


@pytest.mark.parametrize("make,msg", [
    (lambda: ShiftRewrite(replicate=0), "replicate must be a positive int"),
    (lambda: GroupRewrite(groups=1), "groups must be an int >= 2"),
    (lambda: DepthwiseSeparable(multiplier=2.5), "multiplier must be a positive int"),
    (lambda: GroupRewrite(groups=3, layers="conv2d")(shave.capture(nn.Conv2d(8, 16, 3), (torch.randn(1, 8, 5, 5),))),
     "has 8 input and 16 output channels, not both divisible by groups=3"),
    (lambda: DepthwiseSeparable(layers="nope")(shave.capture(nn.Conv2d(8, 16, 3), (torch.randn(1, 8, 5, 5),))),
     "has no node of that name"),
])
def test_bad_arguments_are_one_line_errors(make, msg):
    with pytest.raises(PassError) as e:
        make()
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_passes_are_registered_and_lossy():
    for name in ("shift_rewrite", "group_rewrite", "depthwise_separable"):
        assert get_pass(name).contract == "lossy"


def test_tvm_build_of_rewritten_network_matches_the_ir(block_graph):
    g, x = block_graph
    out = FoldBN()(ShiftRewrite(layers="conv2")(GroupRewrite(groups=2, layers="conv3")(g)))
    cm = shave.compile(out, (torch.from_numpy(x),), passes=[])
    assert rel_err(cm(x), run_graph(out, [x])[0]) < 1e-5


@pytest.mark.parametrize("conv_s,block_s,rewritten", [(2e-5, 1e-5, True), (1e-5, 2e-5, False)])
def test_a_block_measured_slower_than_its_conv_is_not_applied(block_graph, conv_s, block_s, rewritten):
    """With a target, each block and its conv are compiled and timed alone (here: a stand-in
    timer, so the decision is what is tested, not the machine); a slower block keeps the conv."""
    calls = []

    def fake_time(graphs, target):
        calls.append([g.nodes[0].op for g in graphs])
        assert len(graphs[0].nodes) == 1 and graphs[0].nodes[0].op == "conv2d"
        return [conv_s, block_s]

    g, _ = block_graph
    p = DepthwiseSeparable(layers="conv2", target="x86", min_speedup=1.5, timer=fake_time)
    r = p.apply(g)
    out = r.graph
    assert len(calls) == 1
    entry = next(e for e in r.plan if e.name == "conv2")
    assert entry.kept == rewritten and entry.seconds == (conv_s, block_s)
    assert any(n.name == "conv2" for n in out.nodes) != rewritten
    if not rewritten:
        assert "0.50x" in entry.reason
