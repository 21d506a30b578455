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


def test_report_layer_table_follows_each_layer_through_the_passes(setup):
    """The report's per-layer table finds every original layer in the compressed graph (pruned:
    same name; decomposed: "<layer>.<part>" nodes; int8: "<layer>.weight.q") and gives each
    layer's kernel time before and after from the two models' profiles."""
    from shave.compression_report import LAYER_OPS, layer_origins, layer_rows
    from shave.passes import Decompose, FoldBN, Prune, Quantize

    model, images, _ = setup
    x = images[0][:1]
    base = shave.compile(model, (x,))
    original = base.graph
    layers = [n.name for n in original.nodes if n.op in LAYER_OPS]
    pruned = Prune(ratio=0.5, round_to=1)(original)
    decomposed = Decompose("tucker2", rank=(4, 4), layers=[layers[2]], round_to=1)(pruned)
    chosen = Quantize(images[:2], exclude=[layers[1]], min_speedup=0.0)(FoldBN()(decomposed))
    origins = layer_origins(original, chosen)
    assert set(origins.values()) == set(layers)
    assert all(m.op not in LAYER_OPS or m.name in origins for m in chosen.nodes)
    cm = shave.compile(chosen, (x,), passes=[])
    rows = {r[0]: r for r in layer_rows(original, chosen, base.profile(x.numpy()), cm.profile(x.numpy()))}
    assert rows[layers[0]][2] == "pruned to 3 -> 16; int8"
    assert rows[layers[1]][2] == "pruned to 16 -> 32"  # kept float
    assert rows[layers[2]][2] == "pruned to 32 -> 32; 3 layers (in, core, out); int8"
    assert rows[layers[0]][1] == "3 -> 32"
    for name in layers[:3]:  # every conv's kernel time is found, before and after
        assert rows[name][3] > 0 and rows[name][4] > 0, rows[name]
