"""Random small CNNs (tests/fuzz_cnn.py) through every stage that promises numbers: the compiled model
equals PyTorch; pruning keeps the graph runnable and the compiled pruned graph equals its IR; full-rank
decomposition is exact; int8 compiles and equals its integer reference; the input graph never changes.

`make test` runs a few fixed examples (derandomized: the same every run); `make fuzz` runs many new
ones (SHAVE_FUZZ_EXAMPLES, random seeds). A failure prints the minimal description hypothesis found;
add it to REGRESSIONS so it stays fixed.
"""
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import shave
from conftest import rel_err
from fuzz_cnn import build, cnn_descriptions
from shave.reference import run_graph
from shave.passes import Decompose, Prune, Quantize

EXAMPLES = int(os.environ.get("SHAVE_FUZZ_EXAMPLES", "0")) or None
TOL = 1e-4

# descriptions that once failed (batch, channels, height, width, blocks, head)
REGRESSIONS = [
    (1, 4, 6, 6, (("shuffle", 0),), "map"),  # nn.ChannelShuffle was not captured (aten.channel_shuffle)
    (1, 1, 12, 11, (("conv", 12),), "linear"),  # int8: a nearly constant input's tiny scale put the bias past int32
    (2, 3, 14, 14, (("convt", 1), ("bn", 2), ("act", 3), ("conv", 4)), "map"),  # a float island before int8
    (1, 8, 6, 12, (("act", 1024), ("act", 1024), ("act", 65536)), "both"),  # sigmoid, sigmoid, silu: the build hung
]


def _outputs(y):
    return [t.detach().numpy() for t in (y if isinstance(y, tuple) else (y,))]


def check(description):
    model, x = build(description)
    with torch.no_grad():
        ref = _outputs(model(x))
    cm = shave.compile(model, (x,))
    got = cm(x.numpy())
    got = list(got) if isinstance(got, tuple) else [got]
    for r, o in zip(ref, got):
        assert rel_err(o, r) <= TOL, ("compiled vs PyTorch", rel_err(o, r))

    g = cm.graph
    before = str(g), {k: v.copy() for k, v in g.params.items()}
    xn = x.numpy()
    # pruning: the pruned graph compiles (its build checks itself against its IR) and runs
    pruned = Prune(ratio=0.5, round_to=1)(g)
    cp = shave.compile(pruned, (x,))
    for r, o in zip(run_graph(pruned, [xn]), _outputs_np(cp(xn))):
        np.testing.assert_allclose(o, r, rtol=TOL, atol=TOL * max(1.0, float(np.abs(r).max())))
    # full-rank decomposition is exact
    dec = Decompose("tucker2", rank=1.0, round_to=1)(g)
    for r, o in zip(run_graph(g, [xn]), run_graph(dec, [xn])):
        assert rel_err(o, r) <= TOL, ("full-rank decomposition", rel_err(o, r))
    # int8 (8-bit weights) of the captured graph, batch norms unfolded: compiles (its passes, fold_bn
    # after Quantize included, and the build are checked against the integer graph's reference);
    # float ops left between int8 layers (padding, resizing, a batch norm after a transposed conv)
    # are float islands whose values are rounded to int8 again
    calib = [torch.randn(x.shape, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    gi = Quantize(calib, reduce_range=False)(shave.capture(model, (x,)))
    shave.compile(gi, (x,))
    # nothing above changed its input graph
    assert str(g) == before[0] and all(np.array_equal(g.params[k], v) for k, v in before[1].items())


def _outputs_np(y):
    return list(y) if isinstance(y, tuple) else [y]


@pytest.mark.parametrize("description", REGRESSIONS)
def test_fuzz_regressions(description):
    check(description)


@settings(max_examples=EXAMPLES or 6, deadline=None, derandomize=EXAMPLES is None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
@given(cnn_descriptions())
def test_random_cnns(description):
    check(description)
