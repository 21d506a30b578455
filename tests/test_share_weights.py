"""ShareWeights: k-means weight sharing, its compression rate and reported error."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import shave
from shave.errors import PassError
from shave.passes import ShareWeights, registered_passes
from shave.passes.share import compression_rate, kmeans_1d


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(y.mean((2, 3)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = Net().eval()
    return shave.capture(m, (torch.randn(1, 3, 8, 8),))


def _layers(g):
    return [n for n in g.nodes if n.op in ("conv2d", "linear")]


def _data():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)]


def test_exact_when_clusters_cover_the_distinct_values(net):
    g = net.copy()
    rng = np.random.default_rng(0)
    for n in _layers(g):  # weights with 5 distinct values each
        w = g.params[n.inputs[1]]
        g.set_param(n.inputs[1], rng.choice([-0.3, -0.1, 0.0, 0.2, 0.25], size=w.shape).astype(np.float32))
    p = ShareWeights(clusters=5)
    p = p.apply(g)
    out = p.graph
    x = _data()[0]
    np.testing.assert_array_equal(shave.to_torch(out)(x).detach().numpy(), shave.to_torch(g)(x).detach().numpy())
    assert all(x.weight_error == 0 for x in p.plan) and p.plan.output_error == 0
    for a, b in zip(_layers(g), _layers(out)):
        np.testing.assert_array_equal(out.params[b.inputs[1]], g.params[a.inputs[1]])


def test_compression_rate_is_the_papers_formula(net):
    p = ShareWeights(bits=4)
    p = p.apply(net)
    assert [x.name for x in p.plan] == [n.name for n in _layers(net)]
    for x in p.plan:
        assert x.k == 16 and x.rate == pytest.approx(x.n * 32 / (x.n * 4 + 16 * 32))
    n = sum(x.n for x in p.plan)
    assert p.plan.total_rate == pytest.approx(n * 32 / (n * 4 + 3 * 16 * 32))
    assert compression_rate(1000, 256) == pytest.approx(32000 / (8000 + 256 * 32))
    assert 1 < p.plan.model_rate < p.plan.total_rate  # biases stay float32 and count against the whole-model rate
    assert "size only" in p.summary() and f"{p.plan.total_rate:.2f}x" in p.summary()


def test_error_reported_and_weights_take_k_values(net):
    data = _data()
    p = ShareWeights(bits=2, data=data)
    p = p.apply(net)
    out = p.graph
    for n in _layers(out):
        assert len(np.unique(out.params[n.inputs[1]])) <= 4
    for x, n in zip(p.plan, _layers(net)):  # the recorded weight error is the measured one
        w = net.params[n.inputs[1]]
        ws = out.params[out.node(n.name).inputs[1]]
        assert x.weight_error == pytest.approx(np.linalg.norm(ws - w) / np.linalg.norm(w), rel=1e-5)
        assert 0 < x.weight_error < 0.5
    ref = [shave.to_torch(net)(b).detach() for b in data]
    got = [shave.to_torch(out)(b).detach() for b in data]
    want = max(float((o - r).abs().max() / r.abs().max()) for o, r in zip(got, ref))
    assert p.plan.output_error == pytest.approx(want, rel=1e-5) and p.plan.output_error > 0
    # more clusters, less error
    p16 = ShareWeights(bits=4, data=data)
    p16 = p16.apply(net)
    assert p16.plan.output_error < p.plan.output_error
    assert all(a.weight_error < b.weight_error for a, b in zip(p16.plan, p.plan))


def test_kmeans_improves_on_its_linear_initialisation(rng):
    x = rng.standard_normal(5000)  # bell-shaped, like trained weights: linear spacing wastes clusters
    k = 8
    init = np.linspace(x.min(), x.max(), k)
    err_init = np.mean((init[np.abs(x[:, None] - init).argmin(1)] - x) ** 2)
    c, idx = kmeans_1d(x, k)
    assert len(c) == k and np.all(np.diff(c) > 0)
    np.testing.assert_array_equal(idx, np.abs(x[:, None] - c).argmin(1))  # nearest centroid
    assert np.mean((c[idx] - x) ** 2) < 0.8 * err_init


def test_never_mutates_input_and_selects_layers(net):
    before = str(net)
    params = {k: np.array(v) for k, v in net.params.items()}
    p = ShareWeights(clusters=3, layers="c*", exclude="c2*")
    p = p.apply(net)
    out = p.graph
    assert str(net) == before and all(np.array_equal(net.params[k], v) for k, v in params.items())
    assert [x.name for x in p.plan] == [n.name for n in _layers(net) if n.name.startswith("c1")]
    fc = next(n for n in _layers(out) if n.op == "linear")
    assert out.params[fc.inputs[1]] is net.params[fc.inputs[1]]


def test_errors_and_registration(net):
    assert "share_weights" in registered_passes()
    with pytest.raises(PassError, match="one of bits= or clusters="):
        ShareWeights()
    with pytest.raises(PassError, match="at least 2 clusters"):
        ShareWeights(clusters=1)
    with pytest.raises(PassError, match="layers pattern .nothing\\*. matches no layer"):
        ShareWeights(bits=2, layers="nothing*")(net)
    with pytest.raises(PassError, match="ShareWeights evaluation data is empty"):
        ShareWeights(bits=2, data=[])(net)
    assert math.isclose(compression_rate(10, 2), 320 / (10 + 64))
