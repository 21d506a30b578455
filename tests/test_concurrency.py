"""A compiled model and a loaded artifact called from many threads at once give every caller its own answer."""
import threading

import numpy as np
import torch
from torch import nn

import shave

THREADS, CALLS = 8, 500


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16),
                         nn.ReLU6(), nn.Flatten(), nn.Linear(16 * 10 * 10, 10)).eval()


def _hammer(fn, inputs, expected) -> list[str]:
    """THREADS threads, each CALLS calls of fn on rotating inputs; every output compared with its
    single-threaded result. Returns what went wrong (empty: nothing)."""
    problems: list[str] = []
    start = threading.Barrier(THREADS)

    def work(k):
        start.wait()  # all threads call at once
        try:
            for i in range(CALLS):
                j = (k + i) % len(inputs)
                y = fn(inputs[j])
                if not np.array_equal(y, expected[j]):
                    problems.append(f"thread {k} call {i}: wrong output for input {j}")
        except Exception as e:  # noqa: BLE001 - every failure is reported by the test
            problems.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return problems


def test_compiled_and_loaded_models_are_safe_to_call_from_many_threads(tmp_path):
    m = _model()
    x = torch.randn(1, 3, 12, 12)
    cm = shave.compile(m, (x,))
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(THREADS)]
    expected = [cm(a) for a in inputs]
    assert len({e.tobytes() for e in expected}) == len(inputs)  # a mix-up between callers would show
    assert _hammer(cm, inputs, expected) == []
    rt = shave.load(cm.export(tmp_path / "m.shave"))
    assert _hammer(rt, inputs, expected) == []


def test_outputs_belong_to_the_caller(tmp_path):
    """The runtime reuses its input tensors call after call and hands outputs over without a copy:
    an output that is a view of an input (a reshape) must still be the caller's own array, and
    every output must survive the next call unchanged."""
    class ViewOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)

        def forward(self, x):
            return x.reshape(1, -1), self.conv(x)

    torch.manual_seed(0)
    x0, x1 = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    cm = shave.compile(ViewOut().eval(), (x0,))
    for run in (cm, shave.load(cm.export(tmp_path / "v.shave"))):
        first = run(x0.numpy())
        kept = [a.copy() for a in first]
        second = run(x1.numpy())
        for a, k in zip(first, kept):
            np.testing.assert_array_equal(a, k)  # not overwritten by the second call
        np.testing.assert_array_equal(first[0], x0.numpy().reshape(1, -1))
        np.testing.assert_array_equal(second[0], x1.numpy().reshape(1, -1))
        assert all(a.flags.writeable for a in first)
