"""Dynamic batch: one artifact for any batch size (shave.compile(dynamic_batch=...)), the graph
at another batch size (ir/rebatch.py), and the refusals for graphs that do not keep samples apart."""
import threading

import numpy as np
import pytest
import torch
from torch import nn

import shave
from shave.errors import ArtifactError, CompileError, InputError
from shave.api import check_sample_independent
from shave.ir.rebatch import rebatch
from shave.reference import run_graph
from conftest import rewrite_artifact, run_cli


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=8), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, y):
        z = self.conv(x) + y
        return z.flatten(1).reshape(z.shape[0], 8, -1).mean(-1), torch.relu(z)


class MixesSamples(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)  # keeps the shape, but every output depends on every sample


class SeqFirst(nn.Module):
    def forward(self, x):  # [N, C, L] -> [L, N, C]: the batch leaves axis 0
        return x.permute(2, 0, 1) * 2


class ClassToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # x: [N, L, 8]; ViT's class token, a constant broadcast to the batch
        return self.proj(torch.cat([self.token.expand(x.shape[0], -1, -1), x], 1)).relu()


def test_a_constant_broadcast_to_the_batch_follows_it():
    model = ClassToken().eval()
    cm = shave.compile(model, (torch.randn(2, 5, 8),), dynamic_batch=True)
    for n in (1, 3, 8, 9):
        x = torch.randn(n, 5, 8)
        with torch.no_grad():
            np.testing.assert_allclose(cm(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(CompileError, match="does not run at batch 8.*captured at batch 2 or more"):
        shave.compile(model, (torch.randn(1, 5, 8),), dynamic_batch=True)


def test_rebatch_rescales_reshapes_and_keeps_weights():
    g = shave.capture(TwoInputs().eval(), (torch.randn(2, 3, 6, 6), torch.randn(2, 8, 6, 6)))
    g5 = rebatch(g, 5)
    assert [t.shape for _, t in g5.inputs] == [(5, 3, 6, 6), (5, 8, 6, 6)]
    reshapes = [n for n in g5.nodes if n.op == "reshape"]
    assert reshapes and all(n.attrs["shape"][0] == 5 for n in reshapes)
    assert [n.attrs for n in g.nodes if n.op == "reshape"] != [n.attrs for n in reshapes]  # g itself unchanged
    assert all(g5.params[k] is g.params[k] for k in g.params)
    xs = [np.random.default_rng(0).standard_normal(t.shape).astype(np.float32) for _, t in g5.inputs]
    together = run_graph(g5, xs)
    one = rebatch(g, 1)
    for i in range(5):
        for y, y1 in zip(together, run_graph(one, [x[i:i + 1] for x in xs])):
            np.testing.assert_allclose(y[i:i + 1], y1, rtol=1e-5, atol=1e-6)


def test_rebatch_refuses_a_graph_that_moves_the_batch_axis():
    g = shave.capture(SeqFirst().eval(), (torch.randn(2, 4, 5),))
    with pytest.raises(CompileError, match=r"permute.*does not keep the batch on axis 0") as e:
        rebatch(g, 8)
    assert "\n" not in str(e.value)


def test_a_graph_that_mixes_samples_is_refused():
    with pytest.raises(CompileError, match=r"node 'mean' \(mean\) from test_dynamic_batch.py:\d+ .*does not keep the batch"):
        shave.compile(MixesSamples().eval(), (torch.randn(4, 3, 5, 5),), passes=[], dynamic_batch=True)
    g = shave.capture(_cnn(), (torch.randn(1, 3, 16, 16),))
    assert check_sample_independent(g, 4, run_graph, 1e-4) < 1e-5

    def mixing(graph, xs):  # what an op that mixes samples but keeps every shape would compute
        return [y - y.mean(0, keepdims=True) for y in run_graph(graph, xs)]

    with pytest.raises(CompileError, match="mixes the samples of a batch"):
        check_sample_independent(g, 4, mixing, 1e-4)


@pytest.mark.parametrize("bad", ["yes", (0, 8), [], (2.5,), 8])
def test_bad_dynamic_batch_values(bad):
    with pytest.raises(CompileError, match="dynamic_batch must be"):
        shave.compile(_cnn(), (torch.randn(1, 3, 16, 16),), dynamic_batch=bad)


def test_one_artifact_runs_any_batch_and_equals_the_static_builds(tmp_path):
    model = _cnn()
    cm = shave.compile(model, (torch.randn(2, 3, 16, 16),), dynamic_batch=True)
    assert cm.manifest["batch_functions"] == {"1": "main_b1", "2": "main", "8": "main_b8"}
    assert "dynamic batch" in str(cm.report)
    static8 = shave.compile(model, (torch.randn(8, 3, 16, 16),))
    x8 = torch.randn(8, 3, 16, 16)
    assert np.array_equal(cm(x8.numpy()), static8(x8.numpy()))  # the same kernels: the same bits
    rt = shave.load(cm.export(tmp_path / "m.shave"))
    assert rt.dynamic_batch and rt.chunks(21) == [8, 8, 2, 2, 1]
    for n in (1, 2, 3, 8, 11, 21):
        x = torch.randn(n, 3, 16, 16)
        with torch.no_grad():
            ref = model(x).numpy()
        for run in (cm, rt):
            y = run(x.numpy())
            assert y.shape == (n, 10)
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"expected float32\[N,3,16,16\], got float32\[2,3,8,8\]"):
        rt(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="one batch size for all inputs"):
        shave.compile(TwoInputs().eval(), (torch.randn(1, 3, 6, 6), torch.randn(1, 8, 6, 6)),
                      dynamic_batch=(4,))(np.zeros((2, 3, 6, 6), np.float32), np.zeros((3, 8, 6, 6), np.float32))
    assert [a.shape[0] for a in rt.example_inputs(batch=5)] == [5]
    with pytest.raises(InputError, match="takes batch 8 only"):
        shave.load(static8.export(tmp_path / "s.shave")).example_inputs(batch=3)


def test_two_inputs_two_outputs_and_chosen_sizes():
    model = TwoInputs().eval()
    cm = shave.compile(model, (torch.randn(1, 3, 6, 6), torch.randn(1, 8, 6, 6)), dynamic_batch=(1, 4))
    assert cm.manifest["batch_functions"] == {"1": "main", "4": "main_b4"}
    for n in (1, 4, 6, 9):
        x, y = torch.randn(n, 3, 6, 6), torch.randn(n, 8, 6, 6)
        with torch.no_grad():
            refs = model(x, y)
        for got, ref in zip(cm(x, y=y), refs):
            np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_int8_dynamic_batch_equals_the_static_build():
    model = _cnn()
    calib = [torch.randn(1, 3, 16, 16) for _ in range(4)]
    passes = ["fold_bn", shave.passes.Quantize(calibration=calib)]
    dyn = shave.compile(model, (calib[0],), passes=passes, dynamic_batch=True)
    x = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)
    static = shave.compile(rebatch(dyn.graph, 8), (torch.from_numpy(x),), passes=[])
    assert np.array_equal(dyn(x), static(x))
    ys = np.concatenate([dyn(x[i:i + 1]) for i in range(8)])
    np.testing.assert_allclose(dyn(x), ys, rtol=0, atol=1e-5 * np.abs(ys).max())


def test_dynamic_model_from_several_threads_at_different_batches():
    model = _cnn()
    cm = shave.compile(model, (torch.randn(1, 3, 16, 16),), dynamic_batch=True)
    xs = {n: np.random.default_rng(n).standard_normal((n, 3, 16, 16)).astype(np.float32) for n in (1, 5, 8, 13)}
    want = {n: cm(x) for n, x in xs.items()}
    errors = []

    def worker(n):
        try:
            for _ in range(20):
                if not np.array_equal(cm(xs[n]), want[n]):
                    errors.append(f"batch {n}: different outputs")
        except Exception as e:  # pragma: no cover - the failure is reported below
            errors.append(f"batch {n}: {e}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_cli_compiles_a_dynamic_batch_artifact_and_benches_batches(tmp_path):
    model, x = _cnn(), torch.randn(1, 3, 16, 16)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    out = run_cli("compile", tmp_path / "m.pt2", "-o", tmp_path / "m.shave", "--dynamic-batch", "1,4")
    assert out.returncode == 0, out.stderr
    info = run_cli("info", tmp_path / "m.shave")
    assert "float32[N,3,16,16]" in info.stdout and "kernels for 1, 4" in info.stdout, info.stdout
    bench = run_cli("bench", tmp_path / "m.shave", "--batch", "1,6", "--repeats", "3")
    assert bench.returncode == 0, bench.stderr
    assert "batch 1," in bench.stdout and "batch 6," in bench.stdout and "a sample" in bench.stdout
    bad = run_cli("bench", tmp_path / "m.shave", "--batch", "x")
    assert bad.returncode != 0 and "--batch wants batch sizes" in bad.stderr and "Traceback" not in bad.stderr


def test_an_edited_batch_table_is_refused(tmp_path):
    path = shave.compile(_cnn(), (torch.randn(1, 3, 16, 16),), dynamic_batch=True).export(tmp_path / "m.shave")
    edited = rewrite_artifact(path, tmp_path / "edited.shave",
                              edit_manifest=lambda m: m["batch_functions"].update({"8": "main_b1"}))
    with pytest.raises(ArtifactError, match="changed after export|checksum|manifest"):
        shave.load(edited)
