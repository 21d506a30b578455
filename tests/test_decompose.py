"""Decomposition: full rank is exact, costs match the published formulas, rank rules and refits do what they say."""
import platform

import numpy as np
import pytest
import torch
import torch.nn as nn

import shave
from conftest import rel_err
from shave.reference import run_graph
from shave.errors import PassError
from shave.passes import Decompose, FoldBN, get_pass, run_passes
from shave.passes.decompose import Layer, macs
from shave.passes.decompose import factorize as fz
from shave.passes.decompose import ranks

CONV_METHODS = ("weight_svd", "spatial", "tucker2", "cp")


class Net(nn.Module):
    """Stride, padding, dilation, groups, a non-square kernel, with and without bias, BN after a layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(6, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 12, (3, 5), padding=(2, 4), dilation=(2, 2), groups=2)
        self.fc = nn.Linear(12 * 5 * 5, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


@pytest.fixture(scope="module")
def net_graph():
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-1, 1)
        m.bn1.running_var.uniform_(0.5, 2)
        m.bn1.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 10, 10)
    return shave.capture(m, (x,)), x.numpy()


@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.parametrize("fold_first", [False, True])
def test_full_rank_is_exact(net_graph, method, fold_first):
    g, x = net_graph
    g = FoldBN()(g) if fold_first else g
    ref = run_graph(g, [x])[0]
    out = Decompose(method, rank=1.0, layers=["conv1", "conv2"])(g)
    out = FoldBN()(out)  # BN after a decomposed layer still folds (into the last factor)
    assert "batch_norm" not in out.op_counts()
    assert rel_err(run_graph(out, [x])[0], ref) <= 1e-4
    names = [n.name for n in out.nodes if n.name.startswith("conv1.")]
    assert len(names) == {"weight_svd": 2, "spatial": 2, "tucker2": 3, "cp": 4}[method]
    src = {n.source for n in out.nodes if n.name.startswith("conv2.")}
    assert src == {g.node("conv2").source} and src != {""}
    last = out.node(names[-1])
    assert len(last.inputs) == 3  # the last factor carries the bias (here, the folded BN)


def test_svd_full_rank_is_exact_and_input_graph_unchanged(net_graph):
    g, x = net_graph
    before = str(g)
    out = Decompose("svd", rank=1.0, layers="fc")(g)
    assert [n.op for n in out.nodes].count("linear") == 2
    assert rel_err(run_graph(out, [x])[0], run_graph(g, [x])[0]) <= 1e-4
    assert str(g) == before


def _conv_graph(c, n, d, hw=8, groups=1):
    torch.manual_seed(1)
    m = nn.Conv2d(c, n, d, padding=d // 2, bias=False, groups=groups).eval()
    return shave.capture(m, (torch.randn(1, c, hw, hw),))


@pytest.mark.parametrize("method,rank,per_pixel", [
    ("spatial", 4, lambda C, N, d, K: K * d * (C + N)),  # Jaderberg et al.
    ("cp", 5, lambda C, N, d, K: K * (C + 2 * d + N)),  # Lebedev et al.
    ("weight_svd", 6, lambda C, N, d, K: K * (C * d * d + N)),
    ("tucker2", (3, 7), lambda C, N, d, K: K[0] * C + K[0] * K[1] * d * d + K[1] * N),  # Kim et al.
])
def test_operation_counts_match_the_formulas(method, rank, per_pixel):
    C, N, d, hw = 12, 20, 3, 8
    g = _conv_graph(C, N, d, hw)
    assert g.stats()["flops"] == 2 * C * N * d * d * hw * hw  # full conv: C N d^2 per pixel
    out = Decompose(method, rank=rank, layers="conv2d")(g)
    assert out.stats()["flops"] == 2 * per_pixel(C, N, d, rank) * hw * hw
    node = g.node("conv2d")
    assert 2 * macs(method, Layer.of(g, node), rank) == out.stats()["flops"]


def test_costs_with_stride_and_groups_match_the_ir():
    torch.manual_seed(0)
    m = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False).eval()
    g = shave.capture(m, (torch.randn(1, 8, 9, 9),))
    layer = Layer.of(g, g.node("conv2d"))
    for method, rank in (("weight_svd", 3), ("spatial", 2), ("tucker2", (2, 3)), ("cp", 2)):
        out = Decompose(method, rank=rank, layers="conv2d")(g)
        assert out.stats()["flops"] == 2 * macs(method, layer, rank), method


def test_error_falls_with_rank():
    g = _conv_graph(16, 16, 3, hw=6)
    x = np.random.default_rng(0).standard_normal((1, 16, 6, 6)).astype(np.float32)
    ref = run_graph(g, [x])[0]
    for method in CONV_METHODS:
        errs = [rel_err(run_graph(Decompose(method, rank=r, layers="conv2d", round_to=1)(g), [x])[0], ref)
                for r in (0.1, 0.5, 1.0)]
        assert errs[0] > errs[1] > errs[2], (method, errs)


def test_cp_als_recovers_a_low_rank_tensor():
    rng = np.random.default_rng(0)
    t = fz.cp_tensor([rng.standard_normal((d, 4)) for d in (10, 7, 3, 3)])
    est = fz.cp_tensor(fz.cp_als(t, 4))
    assert np.linalg.norm(est - t) / np.linalg.norm(t) < 1e-4


def _rank_k_weight(n, c, d, k, noise, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) @ rng.standard_normal((k, c * d * d))).reshape(n, c, d, d)
    return w + noise * rng.standard_normal(w.shape)


def test_energy_and_vbmf_find_the_rank_of_a_low_rank_weight():
    layer = Layer("conv2d", 32, 16, 3, 3)
    w = _rank_k_weight(32, 16, 3, 5, noise=1e-3)
    assert ranks.energy_rank("weight_svd", layer, w, 0.999) == 5
    assert ranks.energy_rank("weight_svd", layer, w, 0.5) < 5
    assert ranks.vbmf_rank("weight_svd", layer, w) == 5
    pure_noise = np.random.default_rng(1).standard_normal(w.shape)
    assert ranks.vbmf_rank("weight_svd", layer, pure_noise) <= 2


def test_flop_budget_and_rounding():
    layer = Layer("conv2d", 64, 64, 3, 3, in_hw=(8, 8), out_hw=(8, 8))
    for method in CONV_METHODS:
        for budget in (0.5, 0.25):
            r = ranks.budget_rank(method, layer, budget, lanes=8)
            assert macs(method, layer, r) <= budget * macs(None, layer), method
            parts = r if isinstance(r, tuple) else (r,)
            assert all(p % 8 == 0 for p in parts), (method, r)
            bigger = tuple(p + 8 for p in parts) if isinstance(r, tuple) else r + 8
            assert macs(method, layer, bigger) > budget * macs(None, layer), method
    small = Layer("conv2d", 16, 16, 3, 3, in_hw=(8, 8), out_hw=(8, 8))  # half the FLOPs is rank 7: below 8 lanes
    assert ranks.budget_rank("weight_svd", small, 0.5, lanes=8) == 7
    assert ranks.budget_rank("weight_svd", small, 0.001, lanes=8) is None
    assert ranks.round_rank("weight_svd", layer, 13, 8) == 16
    assert ranks.round_rank("weight_svd", layer, 63, 8) == 64
    assert ranks.round_rank("tucker2", layer, (3, 60), 8) == (8, 64)


def test_default_selection_skips_layers_that_would_not_get_cheaper():
    g = _conv_graph(16, 16, 1)  # a 1x1 conv: weight_svd at half rank costs as much as the layer
    d = Decompose("weight_svd", rank=0.5, round_to=1).apply(g)
    out = d.graph
    assert out.op_counts()["conv2d"] == 1 and not d.plan[0].kept
    assert "fewer operations" in d.plan[0].reason
    forced = Decompose("weight_svd", rank=0.5, layers="conv2d", round_to=1)(g)  # named exactly: done anyway
    assert forced.op_counts()["conv2d"] == 2


def test_refinement_lowers_the_error_on_held_out_data():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(24, 8, 1)).eval()
    # inputs with structure (smooth, correlated channels), as images have
    mix = torch.randn(8, 2)

    def data(seed, n):
        gen = torch.Generator().manual_seed(seed)
        base = torch.nn.functional.avg_pool2d(torch.randn(n, 2, 12, 12, generator=gen), 3, 1, 1)
        return torch.einsum("cb,nbhw->nchw", mix, base) + 0.05 * torch.randn(n, 8, 12, 12, generator=gen)

    g = shave.capture(m, (data(0, 1),))
    calib = [data(s, 16) for s in range(4)]
    # one layer: least squares on the calibration data can only do better than the data-free factors there
    calib_x = torch.cat(calib).numpy()
    one_plain = Decompose("tucker2", rank=(4, 8), layers="0")(g)
    one_refit = Decompose("tucker2", rank=(4, 8), layers="0", data=calib)(g)
    ref_layer = run_graph(_output(g, "0"), [calib_x])[0]
    assert (rel_err(run_graph(_output(one_refit, "0.out"), [calib_x])[0], ref_layer)
            < 0.9 * rel_err(run_graph(_output(one_plain, "0.out"), [calib_x])[0], ref_layer))
    # two layers, held-out data: the refits (the second one absorbing the first one's error) still help
    test_x = data(99, 16).numpy()
    ref = run_graph(g, [test_x])[0]
    plain = Decompose("tucker2", rank=(4, 8), layers=["0", "2"])(g)
    refit = Decompose("tucker2", rank=(4, 8), layers=["0", "2"], data=calib)(g)
    e_plain, e_refit = rel_err(run_graph(plain, [test_x])[0], ref), rel_err(run_graph(refit, [test_x])[0], ref)
    assert e_refit < 0.9 * e_plain, (e_plain, e_refit)


def _output(graph, value):
    g = graph.copy()
    g.outputs = [value]
    return g.remove_dead()


def test_clear_errors(net_graph):
    g, _ = net_graph
    with pytest.raises(PassError, match="unknown decomposition method 'qr'"):
        Decompose("qr")
    with pytest.raises(PassError, match=r"Decompose\(svd\) cannot apply to node 'conv1': svd does not apply to conv2d 3x3 6->16"):
        Decompose("svd", layers="conv1")(g)
    with pytest.raises(PassError, match=r"cannot apply to node 'fc': weight_svd does not apply to linear 300->10"):
        Decompose("weight_svd", layers="fc")(g)
    with pytest.raises(PassError, match="node 'bn1' is batch_norm"):
        Decompose("tucker2", layers="bn1")(g)
    with pytest.raises(PassError, match="no node of that name"):
        Decompose("tucker2", layers="conv9")(g)
    with pytest.raises(PassError, match=r"rank 99 is out of range for node 'conv1' .* weight_svd takes 1\.\.16"):
        Decompose("weight_svd", rank=99, layers="conv1")(g)
    with pytest.raises(PassError, match="fractional rank must be in"):
        Decompose("cp", rank=1.5)
    with pytest.raises(PassError, match="cp has none"):
        Decompose("cp", energy=0.9)
    spatial_1x1 = _conv_graph(4, 4, 1)
    with pytest.raises(PassError, match="this kernel is 1x1") as err:
        Decompose("spatial", layers="conv2d")(spatial_1x1)
    assert "\n" not in str(err.value)


def test_registered_by_name_and_reported_as_lossy(net_graph):
    g, x = net_graph
    p = get_pass("decompose")
    assert isinstance(p, Decompose) and p.contract == "lossy"
    probes = [(x,)]
    new, report = run_passes(g, [Decompose("tucker2", rank=0.5, round_to=1)], probes,
                             [run_graph(g, [x])[0]])
    row = report.rows[0]
    assert row.stage == "decompose" and row.contract == "lossy" and row.error > 0
    assert new.stats()["flops"] < g.stats()["flops"]


def test_auto_keeps_only_measured_speedups(tmp_path):
    """One small compile pair: a 3x3 conv whose factors at a quarter of the FLOPs are faster."""
    torch.manual_seed(0)
    m = nn.Conv2d(64, 64, 3, padding=1).eval()
    g = shave.capture(m, (torch.randn(1, 64, 16, 16),))
    cache = tmp_path / "latency.json"
    d = Decompose("weight_svd", rank="auto", flop_budget=0.25, cache=cache)
    r = d.apply(g)
    out, [entry] = r.graph, r.plan
    t_orig, t_dec = entry.seconds
    assert d.timer.measured == 1 and cache.is_file()
    assert entry.kept == (t_orig >= 1.1 * t_dec)
    assert out.op_counts()["conv2d"] == (2 if entry.kept else 1)
    # the same layer again: served from the on-disk cache; an unreachable speed-up keeps the layer
    strict = Decompose("weight_svd", rank="auto", flop_budget=0.25, cache=cache, min_speedup=1e6)
    r2 = strict.apply(g)
    assert strict.timer.measured == 0 and r2.plan[0].seconds == entry.seconds
    assert r2.graph.op_counts()["conv2d"] == 1 and "not faster" in r2.plan[0].reason


def test_auto_times_on_the_device_behind_an_rpc_tracker(tracker, monkeypatch):
    """rank="auto" with an RPC timer: the layer and its factors are built here and timed on the device
    registered at the tracker (a CPU server on loopback here), never loaded in this process."""
    import shave.backends.tvm.timer as tvm_timer
    from shave.errors import CompileError

    def no_local_load(*a, **k):
        raise AssertionError("an RPC timer loaded a library in this process")

    monkeypatch.setattr(tvm_timer, "load_library", no_local_load)
    torch.manual_seed(0)
    g = shave.capture(nn.Conv2d(32, 32, 3, padding=1).eval(), (torch.randn(1, 32, 8, 8),))
    timer = shave.layer_timer(rpc=f"127.0.0.1:{tracker}/shave-test", rounds=3, min_ms=5)
    [entry] = Decompose("weight_svd", rank="auto", flop_budget=0.25, timer=timer).apply(g).plan
    assert timer.measured == 1 and timer.where == f"rpc 127.0.0.1:{tracker}/shave-test"
    assert all(s > 0 for s in entry.seconds)
    with pytest.raises(CompileError, match="no device with key 'rpi4' is registered at the RPC tracker"):
        Decompose("weight_svd", rank="auto", timer=shave.layer_timer(rpc=f"127.0.0.1:{tracker}/rpi4"))(g)
    with pytest.raises(CompileError, match="the layer timer's rpc must be 'host:port/key'"):
        shave.layer_timer(rpc="localhost")


def test_auto_for_another_machine_needs_its_device():
    """rank="auto" for a target this machine cannot run is an error that says how to time it there."""
    from shave.errors import CompileError

    target = "rpi4" if platform.machine() in ("x86_64", "AMD64") else "x86-64"
    g = shave.capture(nn.Conv2d(8, 8, 3, padding=1).eval(), (torch.randn(1, 8, 8, 8),))
    with pytest.raises(CompileError, match=r"timing layers for this target needs its device: .*layer_timer\(rpc="):
        Decompose("weight_svd", rank="auto", target=target)(g)
