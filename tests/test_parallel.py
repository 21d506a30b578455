"""Kernels use the thread pool by their work (schedules/parallel.py): small ones run serially."""
import numpy as np
import pytest
import torch

import shave
from shave.backends.tvm.lower import to_relax
from shave.backends.tvm.schedules import parallel, schedule_module
from shave.zoo import LeNet5
from shave.zoo.fashion_mnist import FashionResNet
from conftest import AVX2, AVX512, parallel_lambdas
from test_schedules import TOL, TILE_SPECS, _conv_case, _kernel_error


def _conv_spec(fields, blocked: bool = False):
    from shave.backends.tvm.schedules.conv import ConvSpec

    return ConvSpec(*fields, vec=8, in_blocked=blocked, out_blocked=blocked, res_blocked=blocked and fields[-1])


def test_work_counts_every_block():
    """A conv's work is its multiply-adds plus one iteration per packed input and output element."""
    from shave.backends.tvm.schedules.conv import compute_primfunc, flat_view

    # LeNet-5's second conv: 6 -> 16 channels, 5x5, on 14x14 (10x10 out)
    spec = flat_view(_conv_spec((1, 6, 14, 14, 16, 5, 5, (1, 1), (0, 0, 0, 0), (1, 1), False, "relu", False)))
    macs = 16 * 10 * 10 * 6 * 25
    n = parallel.work(compute_primfunc(spec))
    assert macs < n < macs + 8 * 14 * 14 + 16 * 10 * 10 + 100  # + packing (6 channels padded to 8) and output
    assert not parallel.worth_parallel(compute_primfunc(spec))
    big = flat_view(_conv_spec((1, 64, 28, 28, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", False)))
    assert parallel.worth_parallel(compute_primfunc(big))


@pytest.mark.parametrize("name", ["3x3_c5_oc27_w13", "dw_s2_c16_blocked", "1x1_c40_oc70"])
def test_small_kernels_run_serially(name, monkeypatch):
    """A kernel under MIN_PARALLEL_WORK has no parallel loop; forced parallel it has; both compute the conv."""
    import tvm

    from shave.backends.tvm.schedules.conv import build_primfunc

    fields = TILE_SPECS[name]
    spec = _conv_spec(fields, blocked=name.endswith("_blocked"))
    case = _conv_case(fields)

    def lambdas():
        return parallel_lambdas(tvm.compile(tvm.IRModule({"main": build_primfunc(spec)}), target=tvm.target.Target(AVX2)))

    assert lambdas() == []
    assert _kernel_error(spec, case) <= TOL
    monkeypatch.setattr(parallel, "MIN_PARALLEL_WORK", 0)
    assert lambdas()
    assert _kernel_error(spec, case) <= TOL


def _parallel_kernels(model, x, target) -> list[str]:
    """Names of the PrimFuncs of `model`'s scheduled module that have a parallel loop."""
    import tvm

    with tvm.target.Target(target):
        mod = schedule_module(to_relax(shave.capture(model, (x,)), target), target)
    return [gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and "T.parallel" in f.script()]


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_lenet_call_never_wakes_the_thread_pool(target):
    """LeNet-5 (convs of at most 0.32 M multiply-adds, pools of 4.7 K iterations): no kernel is
    parallel, so a call never wakes a pool thread. The Fashion-MNIST ResNet's 0.9-1.8 M
    multiply-add convs are parallel."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 28, 28)
    assert _parallel_kernels(LeNet5().eval(), x, target) == []
    big = _parallel_kernels(FashionResNet().eval(), x, target)
    assert big and all(name.startswith("shave_conv") for name in big), big


def test_serial_model_matches_eager():
    """LeNet-5 compiled with every kernel serial gives PyTorch's outputs."""
    torch.manual_seed(0)
    model, x = LeNet5().eval(), torch.randn(3, 1, 28, 28)
    cm = shave.compile(model, (x,))
    with torch.no_grad():
        np.testing.assert_allclose(cm(x.numpy()), model(x).numpy(), rtol=1e-4, atol=1e-5)
