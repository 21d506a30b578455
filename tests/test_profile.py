"""The per-kernel profile: every kernel call of a run, the IR nodes of shave's conv kernels, timings."""
import subprocess
import sys

import numpy as np
import torch
from torch import nn

import shave
from conftest import BLOCK_TORCH
from shave.runtime.profile import BUILTIN


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(y) + y)
        return self.fc(y.mean((2, 3)))


def test_profile_names_the_ir_nodes_of_every_conv_kernel_call(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 12)
    cm = shave.compile(Net().eval(), (x,))
    p = cm.profile(x, repeats=3)
    convs = [c for c in p.calls if c.kernel.startswith("shave_conv")]
    assert len(convs) == 3  # a (+relu), b (+residual +relu), fc (a linear layer on the conv kernel)
    names = {n.name for n in cm.graph.nodes}
    for c in convs:
        assert c.nodes and set(c.nodes) <= names
        tail = cm.graph.type_of(c.nodes[-1]).shape
        assert int(np.prod(c.shape)) == int(np.prod(tail))  # the call's output is the last node's value
        assert c.ms > 0 and c.flops > 0 and c.gflops > 0
    assert sum(len(c.nodes) for c in convs) == 6  # conv, relu; conv, add, relu; linear
    assert any(c.kernel == BUILTIN for c in p.calls)
    assert p.call_ms > 0 and p.threads >= 1
    text = str(p)
    assert "shave_conv" in text and all(", ".join(c.nodes) in text for c in convs)  # IR node names in the table
    assert sum(n for _, n, _ in p.by_kernel()) == len(p.calls)
    # the same from an artifact, in a process without torch, and from the command line
    path = cm.export(tmp_path / "m.shave")
    code = BLOCK_TORCH + f"from shave.cli import main; sys.exit(main(['profile', {str(path)!r}, '--repeats', '2']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kernel calls" in out.stdout and "shave_conv" in out.stdout


def test_report_saved_as_markdown_and_plots(tmp_path):
    from PIL import Image

    from shave.passes import Prune

    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 12)
    cm = shave.compile(Net().eval(), (x,), passes=["fold_bn", Prune(ratio=0.5, round_to=1)])
    paths = cm.report.save(tmp_path / "report", profile=cm.profile(x, repeats=2))
    names = sorted(p.name for p in paths)
    assert names == ["kernels.png", "plan-prune.png", "report.md", "stages.png"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "prune" in text and "-> " in text and "kernel calls" in text
    for p in paths:
        if p.suffix == ".png":
            with Image.open(p) as im:
                assert im.size[0] > 300 and im.size[1] > 100 and im.convert("L").getextrema()[0] < 128  # drawn on


def test_profile_names_the_ir_nodes_of_int8_kernels_with_blocked_activations():
    """int8 kernels whose uint8 activations stay blocked between them are replaced by new kernels
    after lowering (int8_blocked.block_qconvs): the profile still names each call's IR node."""
    from shave.passes import FoldBN, Quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 12, 12)
    calib = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    cm = shave.compile(model, (x,), passes=[FoldBN(), Quantize(calib)])
    qconvs = [n.name for n in cm.graph.nodes if n.op == "qconv2d"]
    assert len(qconvs) == 4
    assert any(f.attrs is not None and "shave.replaces" in f.attrs for f in _scheduled_functions(cm))
    calls = [c for c in cm.profile(x, repeats=2).calls if c.kernel.startswith("shave_qconv")]
    assert [c.nodes[0] for c in calls] == qconvs  # every call, in order, with its node


def _scheduled_functions(cm):
    """The PrimFuncs of cm's graph after the schedules (what block_qconvs made among them)."""
    import tvm

    from shave.backends.tvm.lower import to_relax
    from shave.backends.tvm.schedules import schedule_module
    from shave.target import resolve_target

    target = resolve_target("x86")
    with tvm.target.Target(target):
        mod = schedule_module(to_relax(cm.graph, target), target)
    return [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
