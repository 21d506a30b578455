"""Every torchvision classification family (small versions) compiles for x86
with fold_bn, matches PyTorch within 1e-4 of the output scale, and runs from
its artifact in a process where torch cannot be imported."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import shave
from conftest import BLOCK_TORCH, rel_err
from families import FAMILIES


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def _bn_after_foldable_layer(graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "batch_norm"
               and (p := graph.producer(n.inputs[0])) is not None
               and p.op in ("conv2d", "linear", "conv_transpose2d") and graph.use_count(p.name) == 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_compiles_and_matches(family, artifacts):
    model, inputs = FAMILIES[family]()
    captured = shave.capture(model, inputs)
    cm = shave.compile(captured, inputs, target="x86")
    with torch.no_grad():
        ref = model(*inputs).numpy()
    out = cm(*inputs).numpy()
    assert rel_err(out, ref) < 1e-4  # compiled vs the PyTorch model itself
    # fold_bn removed every BN that directly follows a conv/linear, and the report says so
    assert _bn_after_foldable_layer(captured) > 0 or family in ("squeezenet", "alexnet", "convnext")
    assert _bn_after_foldable_layer(cm.graph) == 0
    folded = _bn_after_foldable_layer(captured)
    assert cm.report["fold_bn"].changes == (f"-{folded} batch_norm" if folded else "")
    cm.export(artifacts / f"{family}.shave")
    np.save(artifacts / f"{family}.in.npy", inputs[0].numpy())
    np.save(artifacts / f"{family}.ref.npy", ref)


def test_artifacts_run_without_torch(artifacts):
    names = sorted(p.name[:-6] for p in artifacts.glob("*.shave"))
    if len(names) != len(FAMILIES):
        pytest.fail(f"family compiles failed or did not run first: have {names}")
    code = BLOCK_TORCH + f"""
import pathlib, numpy as np, shave
d = pathlib.Path({str(artifacts)!r})
for name in {names!r}:
    rt = shave.load(d / (name + ".shave"))
    y, ref = rt(np.load(d / (name + ".in.npy"))), np.load(d / (name + ".ref.npy"))
    err = float(np.abs(y - ref).max() / np.abs(ref).max())
    print(name, err)
    assert err < 1e-4, (name, err)
assert "torch" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(out.stdout.splitlines()) == len(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torch_compile_backend_matches_eager(family):
    """torch.compile(model, backend="shave") (found through the package's entry point) on every
    family: dynamo's graphs compiled by shave, outputs within 1e-4 of eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, inputs = FAMILIES[family]()
    fast = torch.compile(model, backend="shave")
    with torch.no_grad():
        out, ref = fast(*inputs), model(*inputs)
    assert isinstance(out, torch.Tensor) and rel_err(out.numpy(), ref.numpy()) < 1e-4
    assert counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly


def test_torch_compile_backend_options():
    from shave.dynamo import register

    register()  # by hand as well as through the entry point: a no-op when already registered
    model, inputs = FAMILIES["mobilenet_v2"]()
    torch._dynamo.reset()
    fast = torch.compile(model, backend="shave", options={"passes": [], "target": "x86"})
    with torch.no_grad():
        assert rel_err(fast(*inputs).numpy(), model(*inputs).numpy()) < 1e-4
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"unknown \['bogus'\]"), torch.no_grad():
        torch.compile(model, backend="shave", options={"bogus": 1})(*inputs)
