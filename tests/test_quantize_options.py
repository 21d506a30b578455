"""Quantize options for accuracy: weight ranges, weight clipping, bias correction, float first/last layer."""
import numpy as np
import pytest
import torch
from test_quantize import Tiny  # noqa: F401  (the shared tiny model)
from test_quantize import tiny  # noqa: F401  (fixture)

import shave
from shave.reference.interpreter import forward_with_values
from shave.errors import PassError
from shave.passes import Quantize
from shave.passes.quantize import weight_scales
from conftest import AVX2, AVX512_VNNI, NEON_DOT


def _qweights(gi):
    """{(node name, groups): int8 weight}"""
    return {(n.name, n.attrs.get("groups", 1)): gi.params[n.inputs[1]] for n in gi.nodes
            if n.op in ("qconv2d", "qlinear")}


def test_reduce_range_dense_gives_depthwise_eight_bits(tiny):  # noqa: F811
    g, cal = tiny
    q = Quantize(cal, reduce_range="dense")
    w = _qweights(q(g))
    dw = [k for k in w if k[1] > 1]
    assert len(dw) == 1 and 63 < np.abs(w[dw[0]]).max() <= 127
    assert all(np.abs(v).max() <= 63 for k, v in w.items() if k not in dw)
    assert all(np.abs(v).max() > 63 for v in _qweights(Quantize(cal, reduce_range=False)(g)).values())


@pytest.mark.parametrize("target, expected", [(AVX2, "dense"), (AVX512_VNNI, False), (NEON_DOT, False)])
def test_reduce_range_auto_follows_the_targets_dot_product(tiny, target, expected):  # noqa: F811
    """The default, "auto": 7-bit weights only in the layers whose int8 dot product saturates on
    8-bit ones (AVX2's vpmaddubsw pairs: dense and linear; depthwise multiplies in int32 lanes and
    keeps 8 bits); VNNI and Arm sdot get 8 bits throughout. The target is the compile's."""
    from shave.isa import compiling_for

    g, cal = tiny
    q = Quantize(cal)
    assert q.reduce_range == "auto"
    with compiling_for(target):
        assert q.weight_range() == expected and type(q.weight_range()) is type(expected)
        w = _qweights(q(g))
    seven = {k: np.abs(v).max() <= 63 for k, v in w.items()}
    assert any(k[1] > 1 for k in w)  # the tiny model has a depthwise conv
    assert all(s == (expected == "dense" and k[1] == 1) for k, s in seven.items()), seven
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    cm = shave.compile(g, (x,), target=target, passes=[Quantize(cal)])
    got = [n for n in cm.graph.nodes if n.op == "qconv2d"]
    assert got and all((np.abs(cm.graph.params[n.inputs[1]]).max() <= 63)
                       == (expected == "dense" and n.attrs.get("groups", 1) == 1) for n in got)


def test_mse_weight_clipping(rng):
    w = rng.standard_t(4, (4, 2000)).astype(np.float32)  # heavy tails: clipping them pays at 15 levels
    w[3] = rng.uniform(-1, 1, 2000)  # flat: nothing to clip
    smax, smse = weight_scales(w, 7, True, "max"), weight_scales(w, 7, True, "mse")
    assert np.all(smse[:3] < 0.8 * smax[:3]) and smse[3] > 0.9 * smax[3]

    def err(s):
        return ((np.clip(np.round(w / s[:, None]), -7, 7) * s[:, None] - w) ** 2).sum(1)
    assert np.all(err(smse) <= err(smax) * (1 + 1e-6)) and np.all(err(smse)[:3] < 0.7 * err(smax)[:3])
    with pytest.raises(PassError, match="unknown weight method 'kl'"):
        Quantize([np.zeros((1, 3, 12, 12), np.float32)], weight_method="kl")


def _channel_means(graph, cal, names):
    """{layer: per-channel mean of its output over the calibration data}"""
    sums, count = {}, {}
    with torch.no_grad():
        for b in cal:
            _, kept = forward_with_values(graph, (b,), set(names))
            for k, t in kept.items():
                sums[k] = sums.get(k, 0) + t.double().sum([d for d in range(t.ndim) if d != 1])
                count[k] = count.get(k, 0) + t.numel() // t.shape[1]
    return {k: (v / count[k]).numpy() for k, v in sums.items()}


def test_bias_correction_matches_float_channel_means(tiny):  # noqa: F811
    g, cal = tiny
    before = str(g)
    layers = [n.name for n in g.nodes if n.op in ("conv2d", "linear")]
    fm = _channel_means(g, cal, layers)
    # 7-bit weights whatever the host (with 8-bit ones the uncorrected shift is smaller)
    plain = Quantize(cal, simulate=True, method="percentile", bias_correction=False, reduce_range=True)
    corr = Quantize(cal, simulate=True, method="percentile", bias_correction="output", reduce_range=True)
    rc = corr.apply(g)
    sp, sc = plain(g), rc.graph
    assert str(g) == before
    pm, cm = _channel_means(sp, cal, layers), _channel_means(sc, cal, layers)
    for k in layers:
        assert np.abs(cm[k] - fm[k]).max() < 1e-5 * np.abs(fm[k]).max() + 1e-6, k
    shift = max(np.abs(pm[k] - fm[k]).max() for k in layers)
    assert shift > 1e-3  # without the correction the means do move
    assert all(x.bias_shift is not None and x.bias_shift > 0 for x in rc.plan)
    assert "bias shift" in rc.summary()
    # the corrected biases carry over to the integer graph
    gi = Quantize(cal, method="percentile", bias_correction="output")(g)
    x = torch.cat(cal)
    ref = shave.to_torch(g)(x).detach()
    err_c = float((shave.to_torch(gi)(x).detach() - ref).abs().mean())
    err_p = float((shave.to_torch(Quantize(cal, method="percentile", bias_correction=False)(g))(x).detach()
                   - ref).abs().mean())
    assert err_c < err_p, (err_c, err_p)
    # "weights" (the default) corrects only the weights' rounding error: other shifts than "output"
    w = Quantize(cal, simulate=True, method="percentile").apply(g)
    assert all(a.bias_shift > 0 for a in w.plan)
    assert any(abs(a.bias_shift - b.bias_shift) > 1e-3 * b.bias_shift for a, b in zip(w.plan, rc.plan))
    with pytest.raises(PassError, match="bias_correction must be"):
        Quantize(cal, bias_correction="mean")


def test_keep_ends_float(tiny):  # noqa: F811
    g, cal = tiny
    q = Quantize(cal, keep_ends_float=True)
    r = q.apply(g)
    gi = r.graph
    ops = gi.op_counts()
    assert ops.get("conv2d") == 1 and ops.get("linear") == 1 and ops.get("qconv2d") == 2, ops
    assert [x.quantized for x in r.plan] == [False, True, True, False]
    assert r.plan[0].reason == "first/last layer" and "first/last layer" in r.summary()
    with pytest.raises(PassError, match="reduce_range must be"):
        Quantize(cal, reduce_range="x")


class ChannelsLast(torch.nn.Module):
    """ConvNeXt / MLP style: a Linear on channels-last activations (conv -> permute -> linear)."""

    def __init__(self):
        super().__init__()
        self.c, self.fc, self.head = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def forward(self, x):
        y = self.fc(torch.relu(self.c(x)).permute(0, 2, 3, 1))
        return self.head(y.mean((1, 2)))


def test_bias_correction_of_a_linear_on_channels_last_activations():
    """A linear layer's output channels are its last axis: averaging over axis 1 crashed here (4
    spatial rows against 5 features) and is silently wrong when the sizes match. After the
    "output" correction the simulated layer's per-feature means equal the float layer's."""
    from shave.reference import run_graph

    torch.manual_seed(0)
    model, x = ChannelsLast().eval(), torch.randn(2, 3, 4, 4)
    g = shave.capture(model, (x,))
    cal = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def feature_means(graph):
        with torch.no_grad():
            outs = [forward_with_values(graph, (b,), {"fc"})[1]["fc"] for b in cal]
        return torch.stack([o.double().mean((0, 1, 2)) for o in outs]).mean(0).numpy()

    sim = Quantize(cal, simulate=True, reduce_range=False, bias_correction="output")(g)
    fm, sm = feature_means(g), feature_means(sim)
    assert sm.shape == (5,) and np.abs(sm - fm).max() <= 1e-5 * np.abs(fm).max() + 1e-6
    gi = Quantize(cal, reduce_range=False)(g)  # the default correction ("weights"), then int8
    np.testing.assert_array_equal(shave.compile(gi, (x,))(x.numpy()), run_graph(gi, [x.numpy()])[0])
