import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shave
from shave.reference import run_graph
from shave.backends.tvm.lower import LOWERINGS
from shave.errors import IRError
from shave.ir import Graph, Node, TensorType, get_op, load_graph, registered_ops, save_graph, verify


def small_graph() -> Graph:
    g = Graph(inputs=[("x", TensorType((1, 3, 8, 8)))])
    g.set_param("w", np.ones((4, 3, 3, 3), np.float32))
    g.set_param("b", np.arange(4, dtype=np.float32))
    g.nodes.append(Node("conv", "conv2d", ["x", "w", "b"],
                        dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)))
    g.nodes.append(Node("act", "relu", ["conv"]))
    g.outputs = ["act"]
    from shave.ir import infer_types
    return infer_types(g)


def test_types_inferred_and_printed():
    g = verify(small_graph())
    assert g.type_of("act") == TensorType((1, 4, 8, 8))
    text = str(g)
    assert "%conv: float32[1,4,8,8] = conv2d(%x, %w, %b, stride=(1,1)" in text
    assert "return %act" in text


def test_every_op_has_a_tvm_lowering():
    assert set(registered_ops()) <= set(LOWERINGS), set(registered_ops()) - set(LOWERINGS)


def test_params_are_read_only():
    g = small_graph()
    with pytest.raises(ValueError):
        g.params["w"][0, 0, 0, 0] = 5.0


def test_verify_names_the_node_and_the_problem():
    g = small_graph()
    g.set_param("w", np.ones((4, 5, 3, 3), np.float32))  # wrong in-channels
    with pytest.raises(IRError, match=r"node 'conv' \(conv2d\).*3 channels.*expects 5"):
        verify(g)
    g = small_graph()
    g.nodes[1].inputs = ["nope"]
    with pytest.raises(IRError, match="input 'nope' is not defined"):
        verify(g)
    g = small_graph()
    g.nodes[0].type = TensorType((1, 4, 9, 9))
    with pytest.raises(IRError, match="stored type"):
        verify(g)
    g = small_graph()
    del g.nodes[0].attrs["groups"]
    with pytest.raises(IRError, match="missing attribute"):
        verify(g)
    g = Graph(inputs=[("x", TensorType((1, 4, 2, 2)))], outputs=["p"],
              nodes=[Node("p", "channel_permute", ["x"], {"indices": (0, 1, 2, 9)})])
    with pytest.raises(IRError, match=r"node 'p' \(channel_permute\).*indices \[9\] are outside the 4 channels"):
        verify(g)  # a meta-tensor run does not check indices; the op's check does


def test_json_npz_round_trip(tmp_path):
    g = small_graph()
    save_graph(g, tmp_path / "g.zip")
    g2 = verify(load_graph(tmp_path / "g.zip"))
    assert str(g2) == str(g)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_graph(g, [x])[0], run_graph(g2, [x])[0])


def test_load_graph_rejects_garbage(tmp_path):
    p = tmp_path / "bad.zip"
    p.write_bytes(b"not a zip")
    with pytest.raises(IRError, match="not a readable shave IR file"):
        load_graph(p)


def test_flops_of_conv_and_linear():
    g = small_graph()
    # conv: 4 filters x 64 pixels x 27 MACs x 2, plus the bias adds; relu: one op per element
    assert g.stats()["flops"] == 2 * 4 * 64 * 27 + 4 * 64 + 4 * 64
    assert get_op("linear").flops([TensorType((2, 10)), TensorType((5, 10))], TensorType((2, 5)), {}) == 2 * 10 * 10


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 6), k=st.sampled_from([1, 3, 5]), s=st.integers(1, 3), p=st.integers(0, 2),
       g=st.sampled_from([1, "dw"]), h=st.integers(5, 12))
def test_conv_type_inference_matches_torch(c, k, s, p, g, h):
    groups = c if g == "dw" else 1
    ins = [TensorType((1, c, h, h)), TensorType((2 * c, c // groups, k, k))]
    attrs = dict(stride=(s, s), padding=(p, p), dilation=(1, 1), groups=groups)
    if h + 2 * p < k:
        return
    ref = torch.nn.functional.conv2d(torch.zeros(1, c, h, h), torch.zeros(2 * c, c // groups, k, k), None, s, p, 1, groups)
    assert get_op("conv2d").infer(ins, attrs).shape == tuple(ref.shape)


def test_to_torch_is_trainable_and_named_by_params():
    g = small_graph()
    m = shave.to_torch(g)
    assert set(m.param_names) == {"w", "b"}
    x = torch.randn(1, 3, 8, 8)
    m(x).sum().backward()
    w = getattr(m, m.param_names["w"])
    assert w.grad is not None and w.grad.abs().sum() > 0


# --------------------------------------------------------------------------- op traits
def test_op_traits_are_consistent():
    """What passes and backends ask the registry: every layer names its weight, bias and output axis,
    every activation is unary and per element, every fused epilogue is one the conv kernels compute,
    and every clamp form agrees with the op's own kernel."""
    from shave.backends.tvm.schedules.conv_spec import ACTS
    from shave.ir import ops_with

    for name in registered_ops():
        op = get_op(name)
        if op.role == "layer":
            assert op.weight == 1 and op.bias == 2 and op.out_axis in (0, 1), name
        else:
            assert op.weight is None and op.int8 is None, name
        if op.role == "activation":
            assert op.num_inputs == (1, 1), name
        if op.epilogue is not None:
            assert op.role == "activation"
            attrs = {"min": -1.0, "max": 2.5} if name == "clamp" else {}
            assert op.epilogue(attrs).split(":")[0] in ACTS, name
        if op.clip is not None:
            attrs = {"min": -1.0, "max": 2.5} if name == "clamp" else {}
            lo, hi = op.clip(attrs)
            x = torch.linspace(-10, 10, 101)
            assert torch.equal(op.kernel(x, **attrs), torch.clamp(x, lo, hi)), name
    assert ops_with("layer") == {"conv2d", "linear", "conv_transpose2d"}
    assert {"relu", "hardswish", "silu"} <= ops_with("activation")
    with pytest.raises(ValueError, match="unknown op role 'layers'"):
        ops_with("layers")
    with pytest.raises(ValueError, match="role 'thing' is not one of"):
        shave.ir.register_op("bad_role_op", torch.relu, role="thing")


def test_epilogue_pattern():
    """Graph.epilogue: layer -> [residual add] -> [activation], each link only where the value feeds
    nothing else."""
    g = Graph(inputs=[("x", TensorType((1, 4, 6, 6)))])
    g.set_param("w", np.ones((4, 4, 1, 1), np.float32))
    conv = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    g.nodes += [Node("c1", "conv2d", ["x", "w"], conv), Node("add", "add", ["c1", "x"]),
                Node("act", "hardswish", ["add"]), Node("c2", "conv2d", ["act", "w"], conv),
                Node("r", "relu", ["c2"]), Node("tail", "add", ["c2", "r"])]
    g.outputs = ["tail"]
    verify(g)
    e = g.epilogue(g.node("c1"))
    assert (e.add.name, e.residual, e.act.name, e.out) == ("add", "x", "act", "act")
    assert g.epilogue(g.node("c1"), act=lambda n: get_op(n.op).clip is not None).act is None
    assert g.epilogue(g.node("c1"), residual=lambda v: False).nodes == [g.node("c1")]
    e2 = g.epilogue(g.node("c2"))  # c2 feeds the relu and the add: nothing fuses
    assert e2.nodes == [g.node("c2")]


def test_params_are_counted_as_pytorch_counts_them():
    """Weights and biases count; batch-norm statistics and int8 requantisation scales do not (their
    bytes do), so the count matches PyTorch's and Quantize does not make it grow."""
    from shave.passes import FoldBN, Quantize

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 5), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(6 * 12 * 12, 10)).eval()
    x = torch.randn(4, 1, 16, 16)
    g = shave.capture(m, (x[:1],))
    assert g.stats()["params"] == sum(p.numel() for p in m.parameters())
    folded = FoldBN()(g)
    assert folded.stats()["params"] == g.stats()["params"] - 2 * 6  # gamma and beta went into the conv
    q = Quantize([x[i:i + 1] for i in range(4)])(folded)
    assert q.op_counts().get("qconv2d") == 1
    assert q.stats()["params"] == folded.stats()["params"] and q.stats()["bytes"] < folded.stats()["bytes"] / 3
