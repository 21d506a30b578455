import numpy as np
import torch
import torch.nn as nn

import shave
from shave.reference import run_graph
from shave.zoo import FashionResNet, load_fashion_mnist


def test_finetune_learns_and_leaves_input_graph_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    g = shave.capture(model, (torch.randn(4, 8),))
    w = torch.randn(8, 3)
    data = []
    for _ in range(20):
        x = torch.randn(32, 8)
        data.append((x, (x @ w).argmax(1)))
    acc = lambda graph: float(np.mean([(run_graph(graph, [x])[0].argmax(1) == y.numpy()).mean()  # noqa: E731
                                       for x, y in data]))
    before = {k: v.copy() for k, v in g.params.items()}
    tuned = shave.finetune(g, data, steps=200, lr=1e-2)
    assert acc(tuned) > acc(g) + 0.3
    assert all(np.array_equal(g.params[k], v) for k, v in before.items())
    distilled = shave.finetune(g, data, steps=20, lr=1e-2, teacher=tuned)
    assert set(distilled.params) == set(g.params)


def test_data_of_the_wrong_form_is_one_clear_error():
    """finetune wants (inputs, labels) pairs; Quantize takes one batched tensor as one batch."""
    import pytest

    from shave.passes import Quantize

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    g = shave.capture(model, (torch.randn(1, 1, 6, 6),))
    with pytest.raises(shave.PassError, match=r"finetune data item 0 is a Tensor: without a teacher it must yield \(inputs, labels\)"):
        shave.finetune(g, [torch.randn(4, 1, 6, 6)], steps=1)
    with pytest.raises(shave.PassError, match=r"item 0 is a tuple of 3: it must yield"):
        shave.finetune(g, [(torch.randn(4, 1, 6, 6), torch.zeros(4), torch.zeros(4))], steps=1)
    gi = Quantize(torch.randn(8, 1, 6, 6))(g)  # a batch of 8 images, not 8 inputs of (1, 6, 6)
    assert gi.op_counts().get("qconv2d") == 1


def test_fashion_mnist_is_real_data():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    assert abs(float(x.mean())) < 0.1  # normalised with the training statistics
    out = FashionResNet().eval()(x[:2])
    assert out.shape == (2, 10)


def test_reference_module_runs_any_batch():
    torch.manual_seed(0)
    model = FashionResNet().eval()
    g = shave.capture(model, (torch.randn(1, 1, 28, 28),))
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(shave.to_torch(g)(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
