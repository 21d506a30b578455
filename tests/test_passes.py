import numpy as np
import pytest
import torch
import torch.nn as nn

import shave
from shave.reference import run_graph
from shave.errors import PassError
from shave.isa import compiling_for
from conftest import AVX2, AVX512
from shave.passes import FoldBN, Pass, get_pass, register_pass


def bn(c):
    m = nn.BatchNorm2d(c) if c > 0 else None
    with torch.no_grad():
        m.running_mean.normal_(0, 0.5)
        m.running_var.uniform_(0.3, 2.0)
        m.weight.normal_(1, 0.3)
        m.bias.normal_(0, 0.3)
    return m


class Foldable(nn.Module):
    """BN after a conv, a grouped conv, a depthwise conv (no bias), a conv-transpose
    (grouped) and a linear; plus a BN that must stay (it follows a ReLU)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), bn(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), bn(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), bn(8)
        self.t4, self.b4 = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), bn(6)
        self.b5 = bn(6)
        self.fc, self.b6 = nn.Linear(6, 4), nn.BatchNorm1d(4)
        with torch.no_grad():
            self.b6.running_mean.normal_(0, 0.5)
            self.b6.running_var.uniform_(0.3, 2.0)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = self.b3(self.c3(x))
        x = self.b5(torch.relu(self.b4(self.t4(x))))
        return self.b6(self.fc(x.mean((2, 3))))


@pytest.fixture
def graph_and_input():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    return shave.capture(Foldable().eval(), (x,)), x.numpy()


def test_fold_bn_folds_every_foldable_bn_exactly(graph_and_input):
    g, x = graph_and_input
    assert g.op_counts()["batch_norm"] == 6
    g2 = FoldBN()(g)
    left = [n for n in g2.nodes if n.op == "batch_norm"]
    assert [g2.producer(n.inputs[0]).op for n in left] == ["relu"]  # only the BN after a ReLU stays
    ref, out = run_graph(g, [x])[0], run_graph(g2, [x])[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert g.op_counts()["batch_norm"] == 6  # the input graph is untouched


def test_compile_report_shows_the_folding():
    torch.manual_seed(0)
    model = Foldable().eval()
    cm = shave.compile(model, (torch.randn(1, 3, 8, 8),))
    row = cm.report["fold_bn"]
    assert row.changes == "-5 batch_norm"
    assert row.error < 1e-5
    assert cm.report["capture"].params > row.params
    assert "fold_bn" in str(cm.report)


def test_broken_exact_pass_fails_loudly(graph_and_input):
    g, _ = graph_and_input

    @register_pass("test_broken_relu", contract="exact")
    def broken(graph):
        for n in graph.nodes:
            if n.op == "relu":
                n.op = "sigmoid"
        return graph

    with pytest.raises(PassError, match=r"pass 'test_broken_relu' is declared exact but changed the outputs by"):
        shave.compile(Foldable().eval(), (torch.randn(1, 3, 8, 8),), passes=["fold_bn", "test_broken_relu"])


def test_lossy_pass_error_is_measured_not_fatal():
    class ReluToSigmoid(Pass):
        name, contract = "relu_to_sigmoid", "lossy"

        def run(self, graph):
            for n in graph.nodes:
                if n.op == "relu":
                    n.op = "sigmoid"
            return graph

    cm = shave.compile(Foldable().eval(), (torch.randn(1, 3, 8, 8),), passes=[FoldBN(), ReluToSigmoid()])
    assert cm.report["relu_to_sigmoid"].error > 1e-3
    assert cm.report["relu_to_sigmoid"].contract == "lossy"


def test_pass_lookup_errors():
    with pytest.raises(PassError, match="unknown pass 'fold_bm'.*fold_bn"):
        get_pass("fold_bm")
    with pytest.raises(PassError, match="must be a name, a Pass or a callable"):
        get_pass(3)


def test_passes_given_as_one_name_or_a_class():
    """A bare string is one pass (not its characters), a Pass class is made with its defaults, and
    what cannot be a pass list is one clear error, raised before anything is traced."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    for passes in ("fold_bn", FoldBN, [FoldBN], FoldBN()):
        cm = shave.compile(model, (x,), passes=passes)
        assert [r.stage for r in cm.report.rows[1:-1]] == ["fold_bn"], passes
    with pytest.raises(PassError, match="passes must be a list of pass names, Pass objects or functions, got int"):
        shave.compile(model, (x,), passes=3)
    with pytest.raises(PassError, match=r"ratio must be a number in \[0, 1\), got '0.5'"):
        shave.passes.Prune(ratio="0.5")


def test_pass_that_breaks_the_ir_is_named(graph_and_input):
    g, _ = graph_and_input

    def dangling(graph):
        graph.nodes[1].inputs[0] = "missing_value"
        return graph

    with pytest.raises(PassError, match=r"pass 'dangling'.*missing_value"):
        shave.passes.run_passes(g, [dangling], [], [])


def test_compile_accepts_a_rewritten_graph(graph_and_input):
    g, x = graph_and_input
    g2 = FoldBN()(g)
    cm = shave.compile(g2, (x,), passes=[])
    np.testing.assert_allclose(cm(x), run_graph(g, [x])[0], rtol=1e-5, atol=1e-5)
    stages = [r.stage for r in cm.report.rows]
    assert stages[0] == "input graph" and stages[1].startswith("build") and len(stages) == 2


def test_discovery_help_and_dir():
    """help() on every pass shows its documentation; dir(shave) lists the lazily imported entry points."""
    from shave import passes

    for cls in (passes.Prune, passes.Quantize, passes.Decompose, passes.ShiftRewrite, passes.GroupRewrite,
                passes.DepthwiseSeparable, passes.FoldBN, passes.ShareWeights):
        assert cls.__doc__ and len(cls.__doc__) > 200, cls
    assert shave.finetune.__doc__
    assert {"compile", "capture", "finetune", "load", "TuneOptions", "passes"} <= set(dir(shave))


def test_layer_selection_is_one_service():
    """layers=/exclude= mean the same in every pass: names or fnmatch patterns, one error style."""
    from shave.passes.layers import select_layers, weighted_layers

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    g = shave.capture(model, (torch.randn(1, 3, 8, 8),))
    layers = weighted_layers(g)
    convs = [n.name for n in layers if n.op == "conv2d"]
    assert [n.op for n in layers] == ["conv2d", "conv2d", "linear"]
    pick = lambda **kw: [(n.name, exact) for n, exact in select_layers(  # noqa: E731
        g, layers, kw.get("layers"), kw.get("exclude", ()), pass_name="P", what="layer", **kw.get("extra", {}))]
    assert pick() == [(n.name, False) for n in layers]
    assert pick(layers=[convs[1]]) == [(convs[1], True)]
    assert pick(layers=["[02]"], exclude=convs[0]) == [(convs[1], False)]
    assert pick(extra={"why_not": lambda n: "too small" if n.op == "linear" else None}) == [
        (c, False) for c in convs]
    relu = next(n.name for n in g.nodes if n.op == "relu")
    for kw, msg in [({"layers": ["fc*"]}, "P: layers pattern 'fc*' matches no layer"),
                    ({"layers": ["nope"]}, "P: layers names 'nope', but the graph has no node of that name"),
                    ({"layers": [relu]}, f"P: node '{relu}' is relu, not a layer"),
                    ({"layers": [convs[0]], "extra": {"why_not": lambda n: "it is odd"}},
                     f"P cannot apply to node '{convs[0]}': it is odd")]:
        with pytest.raises(PassError) as e:
            pick(**kw)
        assert str(e.value) == msg


def _readme_example(marker: str) -> str:
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    return re.search(rf"<!-- example: {marker} -->\n```python\n(.*?)```", text, re.S).group(1)


def test_readme_custom_pass():
    """The README's pass with an argument, as written: under 20 lines, registered, usable by name with
    arguments in passes=, its error measured."""
    code = _readme_example("custom-pass")
    definition = code.split("cm = shave.compile")[0].strip().splitlines()
    assert len(definition) <= 20
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 10, 10)
    env = {"model": model, "x": x}
    exec(compile(code, "README.md", "exec"), env)
    cm = env["cm"]
    assert [r.stage for r in cm.report.rows[1:-1]] == ["fold_bn", "zero_small_weights"]
    zeroed = [np.count_nonzero(cm.graph.params[n.inputs[1]] == 0) for n in cm.graph.nodes if n.op == "conv2d"]
    assert sum(zeroed) > 0 and 0 < cm.report["zero_small_weights"].error < 0.1
    with pytest.raises(PassError, match=r"pass 'zero_small_weights' does not take these arguments \{'cutoff': 1\}"):
        get_pass("zero_small_weights(cutoff=1)")


def test_passes_named_with_arguments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    x = torch.randn(1, 3, 10, 10)
    for spec in ("prune(ratio=0.5, criterion='l2')", ("prune", {"ratio": 0.5, "criterion": "l2"})):
        p = get_pass(spec)
        assert (type(p).__name__, p.ratio, p.criterion) == ("Prune", 0.5, "l2")
    # built for an AVX2 CPU (runs on every x86 host here): round_to="auto" keeps multiples of its 8 lanes
    cm = shave.compile(model, (x,), passes=["fold_bn", "prune(ratio=0.5)"], target=AVX2)
    assert [n.type.shape[1] for n in cm.graph.nodes if n.op == "conv2d"] == [8, 8]
    with compiling_for(AVX512):  # as shave.compile(target=AVX512) runs it, on any host: 16 lanes keep 16
        g = get_pass("prune(ratio=0.5)")(FoldBN()(shave.capture(model, (x,))))
    assert [n.type.shape[1] for n in g.nodes if n.op == "conv2d"] == [16, 8]
    for bad, msg in [("prune(0.5)", "cannot read pass 'prune\\(0.5\\)': write it as name\\(key=value, ...\\)"),
                     ("prune(ratio=x)", "cannot read pass"),
                     ("prune(ratio=2.0)", "ratio must be a number in \\[0, 1\\)"),
                     (("prunee", {}), "unknown pass 'prunee'")]:
        with pytest.raises(PassError, match=msg):
            get_pass(bad)


def test_a_pass_called_alone_is_checked_and_reports_its_result(graph_and_input, tmp_path):
    """Instruments run around a pass called on its own: the numerical check (an exact pass that changes
    the outputs fails), the IR dump; apply() returns the graph, whether it changed, the error, the plan."""
    from shave.passes import IRDump, NumericCheck, Prune, instrumented

    g, _ = graph_and_input

    class Broken(Pass):
        name, contract = "broken_exact", "exact"

        def run(self, graph):
            graph.node(next(n.name for n in graph.nodes if n.op == "relu")).op = "sigmoid"
            return graph

    with pytest.raises(PassError, match="pass 'broken_exact' is declared exact but changed the outputs"):
        Broken()(g)
    with instrumented():  # no instruments: the caller takes the responsibility
        assert Broken()(g).op_counts()["sigmoid"] == 1
    r = FoldBN().apply(g)
    assert r.modified and r.error < 1e-5 and r.records == []
    assert not FoldBN().apply(r.graph).modified  # nothing left to fold
    pr = Prune(ratio=0.5).apply(g, [NumericCheck(), IRDump(tmp_path)])
    assert pr.error > 0 and {"group", "channels", "kept"} <= set(pr.records[0])
    assert [p.name for p in tmp_path.iterdir()] == ["01-prune.ir"]
    assert shave.ir.load_graph(tmp_path / "01-prune.ir").op_counts() == pr.graph.op_counts()


def test_requirements_and_plans_in_report_and_artifact(tmp_path):
    from shave.passes import Prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    x = torch.randn(1, 3, 10, 10)
    with pytest.raises(PassError, match="pass 'prune' needs batch_norm nodes, and the graph has none: .*run Prune before it"):
        shave.compile(model, (x,), passes=["fold_bn", Prune(ratio=0.5, criterion="bn_gamma")])
    cm = shave.compile(model, (x,), passes=[Prune(ratio=0.5, criterion="bn_gamma"), "fold_bn"], target=AVX2)
    plan = cm.report["prune"].plan
    assert plan and all(rec["kept"] == rec["channels"] // 2 for rec in plan)
    assert "prune:" in cm.report.plans() and "16 -> 8 channels" in cm.report.plans()
    cm.export(tmp_path / "m.shave")
    assert shave.load(tmp_path / "m.shave").report["prune"].plan == plan


class KerasOrder(nn.Module):
    """conv -> ReLU -> BN -> conv: the BN folds forward into an unpadded (grouped) conv and into a
    linear, but not into a padded conv (whose zero border would see the BN's shift)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3), bn(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, groups=2), bn(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.b3.running_mean.normal_(0, 0.5)
            self.b3.running_var.uniform_(0.3, 2.0)
            self.b3.bias.normal_(0, 0.3)

    def forward(self, x):
        x = self.c2(self.b1(torch.relu(self.c1(x))))
        x = self.c3(self.b2(torch.relu(x)))
        return self.fc(self.b3(torch.relu(x).mean((2, 3))))


def test_fold_bn_folds_forward_where_exact():
    torch.manual_seed(0)
    model = KerasOrder().eval()
    x = torch.randn(2, 3, 12, 12)
    g = shave.capture(model, (x,))
    g2 = FoldBN()(g)
    left = [g2.users(n.name)[0].op for n in g2.nodes if n.op == "batch_norm"]
    assert left == ["conv2d"]  # b2, before the padded c3
    ref, out = run_graph(g, [x.numpy()])[0], run_graph(g2, [x.numpy()])[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_calibration_data_means_the_same_to_every_pass():
    """One normalisation: a batched tensor is one batch, items may be tensors, arrays or tuples, and a
    wrong shape is the same one-line error whichever pass got the data."""
    from shave.passes import Decompose, Prune, Quantize
    from shave.passes.calibration import calibration_batches

    x = torch.randn(4, 3, 8, 8)
    assert [b[0].shape for b in calibration_batches(x)] == [(4, 3, 8, 8)]
    assert [type(b[0]) for b in calibration_batches([x.numpy(), (x,)])] == [torch.Tensor, torch.Tensor]
    torch.manual_seed(0)
    g = shave.capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval(), (x[:1],))
    bad = [torch.randn(2, 3, 9, 8)]
    for p in (Prune(ratio=0.5, criterion="taylor", data=bad), Decompose("weight_svd", rank=4, data=bad),
              Quantize(bad)):
        with pytest.raises(PassError, match=r"item 0: input 'input' has shape \(2, 3, 9, 8\), the graph wants \(N, 3, 8, 8\)"):
            p(g)


def test_compile_logs_its_stages(caplog):
    """shave.compile says what each stage did through logging ("shave" loggers), for users who watch
    a long compile; nothing is printed unless they ask."""
    import logging

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with caplog.at_level(logging.INFO, logger="shave"):
        shave.compile(model, (torch.randn(1, 3, 8, 8),))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("shave")]
    assert lines[0].startswith("capture: 3 nodes")
    assert any(m.startswith("pass fold_bn (exact):") and "-1 batch_norm" in m for m in lines)
    assert lines[-1].startswith("build (llvm")


def test_one_pass_object_serves_several_graphs_and_threads():
    """A run's plan comes back with its graph; nothing of one run is read back by another, so the
    same pass object can run on two graphs at once."""
    from concurrent.futures import ThreadPoolExecutor

    from shave.passes import Prune

    graphs = []
    for c in (12, 20):
        torch.manual_seed(c)
        model = nn.Sequential(nn.Conv2d(3, c, 3), nn.ReLU(), nn.Conv2d(c, 4, 3)).eval()
        graphs.append(shave.capture(model, (torch.randn(1, 3, 9, 9),)))
    p = Prune(ratio=0.5, round_to=1)
    serial = [p.apply(g).plan for g in graphs]
    assert [e.channels for plan in serial for e in plan] == [12, 20]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            assert [r.plan for r in pool.map(p.apply, graphs * 2)] == serial * 2
    assert not hasattr(p, "plan")
