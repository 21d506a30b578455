import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import shave
from shave.reference import run_graph
from shave.errors import CaptureError, UnsupportedOpError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


class Cumsum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_nodes_are_named_after_modules_with_source_lines():
    g = shave.capture(Net().eval(), (torch.randn(1, 3, 8, 8),))
    assert [n.name for n in g.nodes if n.op in ("conv2d", "batch_norm", "linear")] == ["conv", "bn", "fc"]
    assert "conv.weight" in g.params and "bn.running_var" in g.params
    assert g.node("conv").source.startswith("test_frontend.py:")
    assert "self.conv(x)" in g.node("conv").source


def test_unsupported_op_names_op_and_source_line():
    with pytest.raises(UnsupportedOpError) as e:
        shave.capture(Cumsum(), (torch.randn(1, 4),))
    msg = str(e.value)
    assert "\n" not in msg
    assert "unsupported op aten.cumsum.default at test_frontend.py:" in msg
    assert "in forward: return torch.cumsum(x, 1)" in msg


def test_unsupported_torch_layer_is_named_as_the_user_wrote_it():
    """An LSTM is refused as nn.LSTM, not as the first aten op inside it (aten.zeros)."""
    class Rnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 8, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(UnsupportedOpError, match=r"Rnn: unsupported layer nn.LSTM \(rnn\) \(its op aten\.\S+ has no "
                                                 r"IR form\) at test_frontend.py:\d+ in forward: return self.rnn"):
        shave.capture(Rnn().eval(), (torch.randn(1, 3, 4),))


def test_untraceable_model_is_one_clear_line(capfd):
    with pytest.raises(CaptureError) as e:
        shave.capture(Branchy(), (torch.randn(2, 2),))
    msg = str(e.value)
    assert msg.startswith("cannot trace Branchy: torch.export: ")
    assert "torch.fx: TraceError" in msg and "\n" not in msg
    assert capfd.readouterr().err == ""  # torch's partial graph and warnings are not printed


def test_bad_example_inputs():
    with pytest.raises(CaptureError, match="example input 1 is a str"):
        shave.capture(Net().eval(), (torch.randn(1, 3, 8, 8), "x"))
    with pytest.raises(CaptureError, match="wants a torch.nn.Module"):
        shave.capture(lambda x: x, (torch.randn(1),))
    with pytest.raises(CaptureError, match="Net fails on the example inputs: RuntimeError: .*expected input"):
        shave.capture(Net().eval(), (torch.randn(1, 5, 8, 8),))


def test_user_model_is_never_mutated():
    torch.manual_seed(0)
    model = Net().train()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="training mode"):
        cm = shave.compile(model, (torch.randn(1, 3, 8, 8),))
    assert model.training
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the compiled model has eval semantics (running statistics, not batch statistics)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x)
    np.testing.assert_allclose(cm(x).numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_fx_fallback_gives_the_same_graph_numbers(monkeypatch):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 3, 8, 8)

    def refuse(*a, **k):
        raise RuntimeError("export refused for this test")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.warns(UserWarning, match="captured it with torch.fx instead"):
        g = shave.capture(model, (x,))
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_graph(g, [x.numpy()])[0], ref, rtol=1e-6, atol=1e-6)
    assert g.op_counts()["conv2d"] == 1 and g.op_counts()["batch_norm"] == 1


def test_numpy_inputs_and_multiple_outputs():
    class Two(nn.Module):
        def forward(self, x):
            return x.relu(), {"neg": -x}

    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    cm = shave.compile(Two(), (x,))
    a, b = cm(x)
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(a, np.maximum(x, 0))
    np.testing.assert_array_equal(b, -x)


def test_in_place_ops_are_read_as_their_results():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.drop = nn.Dropout(inplace=True)

        def forward(self, x):
            y = self.conv(x)
            z = y * 2
            y.relu_()  # not rebound: later reads of y must see the ReLU
            y += z
            return self.drop(torch.nn.functional.hardswish(y, inplace=True)), z

    torch.manual_seed(0)
    model, x = InPlace().eval(), torch.randn(1, 3, 8, 8)
    g = shave.capture(model, (x,))
    with torch.no_grad():
        ref = model(x)
    for o, r in zip(run_graph(g, [x.numpy()]), ref):
        np.testing.assert_allclose(o, r.numpy(), rtol=1e-6, atol=1e-6)


def test_in_place_op_on_a_view_is_refused():
    class ViewMutation(nn.Module):
        def forward(self, x):
            x = x * 1
            x[:, :2].relu_()
            return x

    with pytest.raises(UnsupportedOpError, match=r"in-place aten.relu_.default on a view of another tensor at "
                                                 r"test_frontend.py:\d+ in forward: x\[:, :2\].relu_\(\)"):
        shave.capture(ViewMutation(), (torch.randn(1, 4),))
