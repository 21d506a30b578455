"""shave.compress: a measured search that keeps the score within budget, a recipe that replays,
a report, and one-line errors that still hand back the best result found."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import shave
from shave.reference import run_graph


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


@pytest.fixture(scope="module")
def setup():
    model = _model()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(16, 3, 24, 24, generator=g) for _ in range(6)]
    with torch.no_grad():
        ref = [model(x).argmax(1) for x in images]

    def agreement(m):  # score: top-1 agreement with the original, %
        with torch.no_grad():
            return float(np.mean([(m(x).argmax(1) == r).float().mean() for x, r in zip(images, ref)])) * 100
    return model, images, agreement


def test_compress_keeps_the_budget_and_its_recipe_replays(setup, tmp_path):
    model, images, agreement = setup
    x = images[0][:1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = shave.compress(model, (x,), agreement, max_drop=60.0, train=images, calibration=images[:2],
                       techniques=("prune", "quantize"), recovery={"steps": 10}, short_drop=60.0,
                       time_budget=120, reference=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not changed
    assert r.baseline_score == pytest.approx(100.0)
    assert r.score >= r.baseline_score - 60.0
    assert r.pareto[0].steps == [] and len(r.pareto) >= 2 and all(c.latency_ms > 0 for c in r.pareto)
    kept_ms = [c.latency_ms for c in r.pareto if c.kept]  # each kept step measured faster than the one before
    assert all(b <= 0.98 * a for a, b in zip(kept_ms, kept_ms[1:]))
    assert all(c.score >= r.baseline_score - 60.0 for c in r.pareto if c.kept)
    np.testing.assert_allclose(r.compiled(x), run_graph(r.graph, [x])[0], rtol=1e-3, atol=1e-3)
    # the recipe replays to the same graph, nothing timed
    again = shave.compile(model, (x,), passes=r.recipe)
    np.testing.assert_allclose(run_graph(again.graph, [images[1]])[0],
                               run_graph(shave.passes.FoldBN()(r.graph), [images[1]])[0], rtol=1e-4, atol=1e-4)
    md = r.save_report(tmp_path / "report")
    assert md.read_text().startswith("# shave.compress report") and (tmp_path / "report" / "pareto.png").stat().st_size
    assert "chosen" in str(r)


def test_an_evaluate_that_fails_is_one_line_with_the_best_so_far(setup):
    model, images, agreement = setup
    x = images[0][:1]
    with pytest.raises(shave.CompressError, match="evaluate returned 'good' on the original model; it must return a number") as e:
        shave.compress(model, (x,), lambda m: "good", reference=False)
    assert e.value.best is None
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("disk full")
        return agreement(m)
    with pytest.raises(shave.CompressError, match="evaluate raised RuntimeError on step 1 .*: disk full") as e:
        shave.compress(model, (x,), flaky, techniques=("prune",), reference=False)
    assert "\n" not in str(e.value) and e.value.best is not None and e.value.best.steps == []
    with pytest.raises(shave.CompressError, match="unknown technique 'distill'"):
        shave.compress(model, (x,), agreement, techniques=("distill",))
