"""Shift and channel_shuffle ops; ShiftRewrite, GroupRewrite and DepthwiseSeparable passes."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shave
from conftest import rel_err
from shave.backends.torch import run_graph
from shave.errors import IRError
from shave.ir import Graph, Node, get_op, infer_types, load_graph, save_graph, verify
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
def _scheduled_calls(g):
    import tvm

    from shave.backends.tvm.lower import to_relax
    from shave.backends.tvm.schedules import schedule_module
    from shave.backends.tvm.target import resolve_target
    from shave.backends.tvm.tune import _count_calls

    target = resolve_target("x86")
    with tvm.target.Target(target):
        return _count_calls(schedule_module(to_relax(g), target))


def test_tvm_shift_folds_into_the_next_conv_and_matches_the_ir(rng):
    g, _ = _shift_net(rng, c=12)
    g.node("conv2").attrs = _conv_attrs(stride=2, padding=1)  # padding and stride around the folded shift
    g = verify(infer_types(g))
    calls = _scheduled_calls(g)
    assert not any(k.startswith("shave_shift") for k in calls) and sum(k.startswith("shave_conv") for k in calls) == 2
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
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
