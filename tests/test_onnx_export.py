"""shave.export_onnx: the IR (rewritten or not, float or int8) written as ONNX and run in ONNX Runtime
against the IR's reference."""
import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import shave
from fuzz_cnn import build, cnn_descriptions
from shave.errors import ExportError
from shave.onnx_export import EMITTERS, check_onnx
from shave.ir import registered_ops
from shave.passes import Decompose, FoldBN, Prune, Quantize, ShiftRewrite


def _export(g, tmp_path, name="m.onnx"):
    path = shave.export_onnx(g, tmp_path / name)  # checks itself in ONNX Runtime against the IR
    assert path.exists() and not path.with_name(name + ".tmp").exists()
    return onnx.load(str(path))


def test_every_ir_op_has_an_onnx_form():
    assert set(registered_ops()) <= set(EMITTERS), sorted(set(registered_ops()) - set(EMITTERS))


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cnn_descriptions())
def test_random_cnns_export_and_match(tmp_path_factory, description):
    """The fuzz strategy's graphs (every op kind it makes), captured with batch norms, folded,
    and quantized to int8, each agree with the IR in ONNX Runtime."""
    model, x = build(description)
    tmp = tmp_path_factory.mktemp("onnx")
    g = shave.capture(model, (x,))
    _export(g, tmp, "captured.onnx")
    _export(FoldBN()(g), tmp, "folded.onnx")
    calib = [torch.randn(x.shape, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    _export(Quantize(calib, reduce_range=False)(g), tmp, "int8.onnx")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.Hardswish(),
                                  nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU6())
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        y = self.body(x)
        return self.fc(y.mean((2, 3))), torch.nn.functional.interpolate(y, scale_factor=2.0)


def test_rewritten_graphs_export(tmp_path):
    """Pruned, decomposed, shift-rewritten and int8 graphs (what compression makes) export and match."""
    torch.manual_seed(0)
    m, x = Small().eval(), torch.randn(2, 3, 12, 12)
    g = FoldBN()(shave.capture(m, (x,)))
    cal = [torch.randn(2, 3, 12, 12) for _ in range(3)]
    variants = {"pruned": Prune(ratio=0.5)(g), "tucker2": Decompose("tucker2", rank=0.5)(g),
                "shift": ShiftRewrite(data=cal)(g)}
    variants["int8"] = Quantize(cal)(variants["pruned"])
    assert variants["shift"].op_counts().get("shift") and variants["int8"].op_counts().get("qconv2d")
    for name, v in variants.items():
        proto = _export(v, tmp_path, f"{name}.onnx")
        if name == "int8":  # QDQ form: integer tensors between layers, Q/DQ around float compute
            ops = {n.op_type for n in proto.graph.node}
            assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
            assert any(i.data_type == onnx.TensorProto.INT8 for i in proto.graph.initializer)


def test_int8_exports_are_checked_node_by_node(tmp_path):
    """An int8 graph's export is checked layer by layer (one-code rounding differences compound end
    to end in deep networks): a correct export passes, one wrong int8 weight is named by its node."""
    torch.manual_seed(0)
    m, x = Small().eval(), torch.randn(2, 3, 12, 12)
    gi = Quantize([torch.randn(2, 3, 12, 12) for _ in range(3)])(FoldBN()(shave.capture(m, (x,))))
    proto = shave.onnx_export.to_onnx(gi)
    good = tmp_path / "good.onnx"
    good.write_bytes(proto.SerializeToString())
    assert check_onnx(gi, good) <= 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]  # the probe copy is removed
    w = next(i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4)
    arr = onnx.numpy_helper.to_array(w).copy()
    big = int(np.abs(arr.astype(np.int32)).argmax())  # the largest weight, negated: many codes off whatever the bits
    arr.flat[big] = -arr.flat[big]
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(ExportError, match=r"ONNX export of node '[^']+' \(qconv2d\).*codes on the same inputs"):
        check_onnx(gi, bad)


def test_compiled_model_exports_its_graph(tmp_path):
    torch.manual_seed(0)
    m, x = Small().eval(), torch.randn(1, 3, 12, 12)
    cm = shave.compile(m, (x,))
    proto = _export(cm, tmp_path)
    assert [o.name for o in proto.graph.output] == list(cm.graph.outputs)
    assert [i.name for i in proto.graph.input] == [n for n, _ in cm.graph.inputs]
    # every weight written once: the linear layer's only as its transposed copy
    stored = sum(onnx.numpy_helper.to_array(i).nbytes for i in proto.graph.initializer)
    assert stored <= sum(a.nbytes for a in cm.graph.params.values()) + 256  # + small constants (scales, axes)
    fc = next(n for n in cm.graph.nodes if n.op == "linear")
    assert fc.inputs[1] not in {i.name for i in proto.graph.initializer}


def test_export_errors_are_one_line(tmp_path):
    torch.manual_seed(0)
    m, x = Small().eval(), torch.randn(1, 3, 12, 12)
    g = shave.capture(m, (x,))
    with pytest.raises(ExportError, match="does not exist"):
        shave.export_onnx(g, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match="wants a shave Graph"):
        shave.export_onnx(m, tmp_path / "m.onnx")
    # an export that disagrees with the IR is refused, naming the error
    bad = tmp_path / "bad.onnx"
    proto = shave.onnx_export.to_onnx(g)
    w = next(i for i in proto.graph.initializer if len(i.dims) == 4)
    arr = onnx.numpy_helper.to_array(w) * 1.1
    w.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), w.name))
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(ExportError, match="disagrees with the IR"):
        check_onnx(g, bad)


def test_pruned_decomposed_int8_mobilenet_v2_runs_in_onnx_runtime(tmp_path):
    """MobileNetV2 (torchvision's definition) pruned, decomposed and quantized exports in QDQ form;
    the file agrees with the IR as written, and ONNX Runtime's own fused int8 kernels (QLinearConv,
    7-bit weights as Quantize's default on AVX2 targets) stay close to it."""
    import onnxruntime as ort

    from shave.zoo import torchvision_models

    torch.manual_seed(0)
    m = torchvision_models().mobilenet_v2().eval()
    x = torch.randn(1, 3, 64, 64)
    g = FoldBN()(shave.capture(m, (x,)))
    g = Decompose("tucker2", rank=0.5)(Prune(ratio=0.3)(g))
    cal = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    gi = Quantize(cal, reduce_range=True)(g)
    assert gi.op_counts().get("qconv2d", 0) > 40
    path = shave.export_onnx(gi, tmp_path / "mnv2.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # fusions on: ORT's int8 kernels
    assert {n.op_type for n in onnx.load(str(path)).graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    fused = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    ref = shave.reference.run_graph(gi, [x.numpy()])[0]
    assert np.abs(fused - ref).max() <= 0.05 * np.abs(ref).max()
