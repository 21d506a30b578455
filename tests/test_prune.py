"""Pruning: channel propagation is exact, criteria and options do what they say."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import shave
from conftest import AVX2, AVX512, NEON, rel_err
from shave.reference import run_graph
from shave.errors import PassError
from shave.ir import Graph, Node, TensorType, infer_types
from shave.passes import FoldBN, Prune
from shave.passes.prune import analyse, remove_channels
from shave.passes.prune.apply import removal_map
from families import FAMILIES


def zero_consumers(graph, units):
    """Zero every weight slice that reads the channels of `units`, so those
    channels contribute nothing; removing them must then change nothing."""
    g = graph.copy()
    reduces = analyse(graph).reduces
    for (value, axis), idx in removal_map(units).items():
        if (value, axis) in reduces:
            arr = np.array(g.params[value])
            arr[(slice(None),) * axis + (idx,)] = 0
            g.set_param(value, arr)
    return g


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_graph(request):
    model, inputs = FAMILIES[request.param]()
    return request.param, FoldBN()(shave.capture(model, inputs)), inputs[0].numpy()


@pytest.mark.parametrize("criterion", ["l1", "bn_gamma"])
def test_pruning_zeroed_channels_is_exact(family_graph, criterion):
    family, graph, x = family_graph
    p = Prune(ratio=0.5, criterion=criterion, round_to=1)
    units = p.select(graph)
    assert units, f"{family}: nothing prunable"
    zeroed = zero_consumers(graph, units)
    pruned = remove_channels(zeroed.copy(), units)
    shave.ir.verify(pruned)
    assert pruned.stats()["params"] < graph.stats()["params"]
    assert rel_err(run_graph(pruned, [x])[0], run_graph(zeroed, [x])[0]) <= 1e-5


def test_every_case_kind_is_pruned_through():
    """The op kinds users' tools stumble on all lie inside pruned groups somewhere in the zoo."""
    seen = set()
    for family in ("resnet", "densenet", "shufflenet_v2", "resnext", "mobilenet_v2", "alexnet", "efficientnet"):
        model, inputs = FAMILIES[family]()
        g = FoldBN()(shave.capture(model, inputs))
        touched = {d[0] for u in Prune(ratio=0.5, round_to=1).select(g) for d in u.indices}
        for n in g.nodes:
            if n.name in touched or any(v in touched for v in n.inputs):
                kind = n.op if n.op != "conv2d" else ("depthwise" if n.attrs["groups"] == n.type.shape[1] > 1
                                                      else "grouped" if n.attrs["groups"] > 1 else "conv2d")
                seen.add(kind)
    assert {"add", "concat", "slice", "channel_permute", "grouped", "depthwise", "reshape", "linear", "mul"} <= seen


def _two_conv_graph(c=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(2, 0.1, c))  # gamma: first channels matter most
        model[0].weight.mul_(torch.linspace(0.1, 2, c).view(-1, 1, 1, 1))  # filter norm: the reverse
    return shave.capture(model, (torch.randn(1, 3, 8, 8),))


def test_criteria_rank_differently():
    g = _two_conv_graph()
    [group] = analyse(g).groups
    l1 = Prune(criterion="l1", round_to=1).select(g)
    gamma = Prune(criterion="bn_gamma", round_to=1).select(g)
    drop = lambda units: sorted(int(u.indices[("0.weight", 0)][0]) for u in units)  # noqa: E731
    assert drop(l1) == list(range(8))  # smallest filters are the first ones
    assert drop(gamma) == list(range(8, 16))  # smallest gammas are the last ones
    assert group.size == 16


def test_rounding_to_vector_width_and_ratio_bounds():
    g = _two_conv_graph(c=20)
    r = Prune(ratio=0.5, round_to=8).apply(g)
    out = r.graph
    assert r.plan == [("0", 20, 16)]  # keep 10 -> rounded up to 16
    assert r.records == [{"group": "0", "channels": 20, "kept": 16}] and r.summary() == "0: 20 -> 16 channels"
    assert out.type_of("0").shape[1] == 16
    with pytest.raises(PassError, match=r"ratio must be a number in \[0, 1\)"):
        Prune(ratio=1.0)
    with pytest.raises(PassError, match="unknown pruning criterion 'taylor2'"):
        Prune(criterion="taylor2")
    with pytest.raises(PassError, match="round_to must be 'auto', an int or None, got '8'"):
        Prune(round_to="8")


@pytest.mark.parametrize("target, kept", [(AVX512, 32), (AVX2, 24), (NEON, 20)])
def test_auto_rounding_follows_the_target_not_the_host(target, kept):
    """round_to="auto" is the fp32 vector width of the pass's target (16, 8, 4 lanes), or of the
    shave.compile that runs it when it has none."""
    from shave.isa import compiling_for

    g = _two_conv_graph(c=40)  # keep 20 of 40, rounded up to whole vectors
    p = Prune(ratio=0.5, target=target).apply(g)
    assert p.plan == [("0", 40, kept)]
    with compiling_for(target):
        q = Prune(ratio=0.5).apply(g)
    assert q.plan == p.plan


def test_exclude_and_global_ratio():
    model, inputs = FAMILIES["resnet"]()
    g = FoldBN()(shave.capture(model, inputs))
    p = Prune(ratio=0.5, exclude=["layer1.*"], round_to=1).apply(g)
    assert all(not name.startswith("layer1.") or kept == size for name, size, kept in p.plan) and p.plan
    assert not any(name.startswith("layer1.") for name, _, _ in p.plan)
    glob = Prune(ratio=0.3, per_layer=False, round_to=1).apply(g)
    ratios = {size and 1 - kept / size for _, size, kept in glob.plan}
    assert len(ratios) > 1  # global ranking prunes groups by different amounts
    total = sum(s for _, s, _ in glob.plan)
    assert abs(sum(s - k for _, s, k in glob.plan) - int(0.3 * total)) <= 1


def test_pruned_graph_compiles_and_trains():
    model, inputs = FAMILIES["shufflenet_v2"]()
    g = Prune(ratio=0.5)(FoldBN()(shave.capture(model, inputs)))
    x = inputs[0].numpy()
    cm = shave.compile(g, (x,), passes=[])
    assert rel_err(cm(x), run_graph(g, [x])[0]) < 1e-4
    m = shave.to_torch(g)
    out = m(torch.from_numpy(x))
    np.testing.assert_allclose(out.detach().numpy(), run_graph(g, [x])[0], rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_compile_reports_pruning():
    model, inputs = FAMILIES["resnet"]()
    cm = shave.compile(model, inputs, passes=["fold_bn", Prune(ratio=0.5)])
    row = cm.report["prune"]
    assert row.contract == "lossy" and row.error > 0
    assert row.flops < cm.report["fold_bn"].flops * 0.75  # stem input and logits keep their width
    assert row.params < cm.report["fold_bn"].params * 0.5


def test_op_without_channel_rule_is_named(monkeypatch):
    from shave.ir import ops
    relu = ops.get_op("relu")
    monkeypatch.setitem(ops._REGISTRY, "relu", ops.OpDef("relu", relu.kernel, relu.flops))
    with pytest.raises(PassError, match="op 'relu' \\(node '2'\\) has no channel rule"):
        Prune()(_two_conv_graph())


def test_mean_over_channels_freezes_them():
    g = Graph(inputs=[("x", TensorType((1, 3, 4, 4)))])
    g.set_param("w", np.ones((8, 3, 1, 1), np.float32))
    g.nodes += [Node("c", "conv2d", ["x", "w"], dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)),
                Node("m", "mean", ["c"], dict(axes=(1,), keepdim=False))]
    g.outputs = ["m"]
    infer_types(g)
    assert analyse(g).groups == []  # pruning a channel would change the mean


def _calibration(inputs, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(inputs[0].shape, generator=gen) for _ in range(n)]


def test_taylor_needs_data_and_scores_by_effect():
    g = _two_conv_graph()
    with pytest.raises(PassError, match=r"Prune\(criterion='taylor'\) calibration needs data"):
        Prune(criterion="taylor")
    with pytest.raises(PassError, match=r"Prune\(criterion='taylor'\) calibration data is empty"):
        Prune(criterion="taylor", data=[])
    p = Prune(criterion="taylor", data=_calibration([torch.zeros(1, 3, 8, 8)]), round_to=1)
    units = p.select(g)
    assert len(units) == 8
    out = p(g)
    assert out.type_of("0").shape[1] == 8


def test_reconstruction_beats_l1_on_the_next_layer():
    """ThiNet selection + least-squares refit keeps the output closer than L1 at the same ratio."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1)).eval()
    x = torch.randn(1, 3, 12, 12)
    g = shave.capture(model, (x,))
    data = _calibration([x], n=8)
    ref = run_graph(g, [x.numpy()])[0]
    err = {}
    for criterion in ("l1", "reconstruction"):
        p = Prune(ratio=0.5, criterion=criterion, round_to=1, data=data if criterion != "l1" else None)
        err[criterion] = rel_err(run_graph(p(g), [x.numpy()])[0], ref)
    assert err["reconstruction"] < 0.6 * err["l1"], err
    assert g.params["2.weight"].shape == (16, 32, 3, 3)  # the input graph is unchanged


def test_reconstruction_falls_back_where_it_cannot_apply():
    model, inputs = FAMILIES["resnet"]()
    g = FoldBN()(shave.capture(model, inputs))
    out = Prune(ratio=0.5, criterion="reconstruction", data=_calibration(inputs, n=2), round_to=1)(g)
    assert out.stats()["params"] < g.stats()["params"]


def test_iterative_prune_reaches_the_one_shot_widths_with_a_recovery_after_each_step():
    from shave.passes import Prune
    from shave.zoo import FashionResNet

    torch.manual_seed(0)
    g = shave.capture(FashionResNet().eval(), (torch.randn(1, 1, 28, 28),))
    one = Prune(ratio=0.75, round_to=None)(g)
    seen = []

    def recover(graph):
        seen.append(graph.stats()["params"])
        return graph

    it = Prune(ratio=0.75, round_to=None, steps=3, recover=recover)(g)
    assert [(n.name, n.type.shape) for n in it.nodes] == [(n.name, n.type.shape) for n in one.nodes]
    assert len(seen) == 3 and seen[0] > seen[1] > seen[2] == one.stats()["params"]
    with pytest.raises(shave.PassError, match="recover returned a NoneType after step 1"):
        Prune(ratio=0.5, steps=2, recover=lambda graph: None)(g)
    with pytest.raises(shave.PassError, match="steps must be a positive int"):
        Prune(ratio=0.5, steps=0)



def test_keep_prunes_the_named_groups_to_their_widths_only():
    model, inputs = FAMILIES["resnet"]()
    g = FoldBN()(shave.capture(model, inputs))
    groups = [(grp.name, grp.size) for grp in analyse(g).groups if grp.size > 1]
    (a, size_a), (b, size_b) = groups[0], groups[-1]
    p = Prune(keep={a: 3, b: size_b - 1}).apply(g)
    assert sorted(p.plan) == sorted([(a, size_a, 3), (b, size_b, size_b - 1)])  # the others stay whole
    assert "keep={" in repr(Prune(keep={a: 3}))  # the recipe shows it
    x = inputs[0]
    ref = Prune(ratio=1 - 3 / size_a, round_to=1, exclude=[part for n, _ in groups if n != a for part in n.split("+")])(g)
    np.testing.assert_allclose(run_graph(Prune(keep={a: 3})(g), [x])[0], run_graph(ref, [x])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(PassError, match="Prune keep names 'nope', which is no channel group of this graph"):
        Prune(keep={"nope": 2})(g)
    with pytest.raises(PassError, match="Prune keep must be a dict"):
        Prune(keep={a: 0})
