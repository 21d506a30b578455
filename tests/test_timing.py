"""LayerTimer: cached by what decides latency, graphs alike in it measured once."""
import json

import torch
from torch import nn

import shave
from shave.passes.layers import cut_out


def _layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 1)).eval()
    g = shave.capture(model, (torch.randn(1, 8, 10, 10),))
    return [cut_out(g, [n.name]) for n in g.nodes if n.op == "conv2d"]


def test_graphs_alike_are_measured_once_and_the_cache_is_kept(tmp_path):
    a, b, c = _layers()  # a and b differ in weights only
    measured = []

    def seconds(graphs, target):
        measured.append(len(graphs))
        return [float(g.nodes[0].type.shape[1]) for g in graphs]  # a stand-in: output channels

    timer = shave.timing.FunctionTimer(seconds, cache=tmp_path / "t.json")
    target = {"kind": "llvm"}
    assert timer.time([a, b, c, a], target) == [8.0, 8.0, 16.0, 8.0]
    assert measured == [2] and timer.measured == 1  # a (= b) and c, together
    assert timer.time([c, b, a, c], target) == [16.0, 8.0, 8.0, 16.0] and measured == [2, 2]  # order kept
    assert timer.time([a, c], target) == [8.0, 16.0] and measured == [2, 2]  # from the cache
    again = shave.timing.FunctionTimer(seconds, cache=tmp_path / "t.json")
    assert again.time([b, c], target) == [8.0, 16.0] and measured == [2, 2]  # from the file
    assert len(json.loads((tmp_path / "t.json").read_text())) == 2
