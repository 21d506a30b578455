"""MetaSchedule tuning of the conv kernels: persistent database, reuse, RPC tracker on loopback."""
import json

import pytest
import torch

import shave
from conftest import AVX2
from shave.backends.tvm.schedules.conv import ConvSpec, build_primfunc, compute_primfunc, default_schedule
from shave.backends.tvm.tune import LEDGER


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(12, 12, 3, padding=1, groups=12), torch.nn.ReLU6()).eval()


@pytest.mark.parametrize("spec", [
    ConvSpec(1, 5, 9, 11, 12, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), False, "relu", True, 8),
    # the lane-groups kernel: its trace holds a tensorize of the intrinsic its workload registered
    ConvSpec(1, 16, 9, 11, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", True, 8, groups=4,
             in_blocked=True, out_blocked=True, kernel="lane_groups"),
], ids=["direct", "lane_groups"])
def test_default_trace_replays_the_default_kernel(spec):
    import tvm

    sch = tvm.s_tir.Schedule(compute_primfunc(spec))
    default_schedule(spec).trace.apply_to_schedule(sch, remove_postproc=False)
    tvm.ir.assert_structural_equal(sch.mod["main"].with_attr("tirx.is_scheduled", True), build_primfunc(spec))


def test_tune_over_rpc_then_reuse_without_tuning(tmp_path, tracker):
    """Built for an explicit AVX2 CPU (runs on every x86 host here): the tile candidates depend on
    the vector width, which 'x86' would take from the host (16 lanes on AVX-512: fewer tiles)."""
    m, x = _model(), torch.randn(1, 3, 14, 14)
    db = tmp_path / "db"
    opts = shave.TuneOptions(trials=4, trials_per_iter=4, database=db, rpc=f"127.0.0.1:{tracker}/shave-test",
                             progress=False)
    cm = shave.compile(m, (x,), target=AVX2, tune=opts)
    t = cm.tuning
    assert t.tasks == 2 and t.tuned_now == 2 and t.trials >= 4 and t.tiles_measured >= 4
    # the default schedule is a record: a kernel's best is never slower than its default, as measured
    assert all(best <= tiled for _, _, _, tiled, best, _ in t.kernels)
    ledger = json.loads((db / LEDGER).read_text())
    tile_entries = [v for k, v in ledger.items() if k.startswith("tiles:")]
    assert len(tile_entries) == 2 and all(len(v["candidates"]) >= 2 for v in tile_entries)
    searched = [v for k, v in ledger.items() if not k.startswith("tiles:")]
    assert len(searched) == 2 and all(v["budget"] >= 1 for v in searched)
    records = (db / "records.json").read_text().splitlines()
    assert len(records) >= 2 + 4  # one default per kernel + the measured candidates
    torch.testing.assert_close(cm(x), m(x), rtol=1e-4, atol=1e-5)
    assert "tuned 2 conv kernels" in cm.report.rows[-1].changes

    # same kernels, same database, measured here this time: nothing is tuned again
    again = shave.compile(m, (x,), target=AVX2,
                          tune=shave.TuneOptions(trials=4, trials_per_iter=4, database=db, progress=False))
    assert again.tuning.tuned_now == 0 and again.tuning.trials == 0 and again.tuning.tiles_measured == 0
    assert again.tuning.kernels == t.kernels
    assert (db / "records.json").read_text().splitlines() == records
    torch.testing.assert_close(again(x), m(x), rtol=1e-4, atol=1e-5)


def test_tune_errors(tmp_path, tracker):
    m, x = _model(), torch.randn(1, 3, 8, 8)
    with pytest.raises(shave.CompileError, match="trials must be an int >= 0"):
        shave.TuneOptions(trials=-1)
    with pytest.raises(shave.CompileError, match="host:port/key"):
        shave.TuneOptions(rpc="localhost")
    with pytest.raises(shave.CompileError, match="tune must be None or a shave.TuneOptions"):
        shave.compile(m, (x,), tune=True)
    with pytest.raises(shave.CompileError, match="no device with key 'rpi4'.*keys there: shave-test"):
        shave.compile(m, (x,), tune=shave.TuneOptions(trials=2, database=tmp_path, rpc=f"127.0.0.1:{tracker}/rpi4"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / LEDGER).write_text("{not json")
    with pytest.raises(shave.CompileError, match="unreadable shave-tasks.json"):
        shave.compile(m, (x,), tune=shave.TuneOptions(trials=2, database=tmp_path / "bad"))


@pytest.mark.parametrize("confirm, chosen", [((1.0, 0.9, 1.0, 0.9), "challenger"),  # wins twice
                                             ((1.0, 1.0, 1.0, 0.9), "default"),  # the win was a burst
                                             ((1.0, 0.99, 1.0, 0.99), "default")])  # inside the margin
def test_tile_search_keeps_the_default_unless_a_tile_wins_twice(tmp_path, monkeypatch, confirm, chosen):
    """A burst of load during the first measurement must not pick a tile: the challenger
    is measured again against the default, interleaved, and must win both times by TILE_MARGIN."""
    from tvm.s_tir import meta_schedule as ms

    from shave.backends.tvm import tune
    from shave.backends.tvm.schedules.conv import candidate_tiles, default_tile

    spec = ConvSpec(1, 16, 14, 14, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", False, 8)
    tiles = candidate_tiles(spec)
    default, challenger = "{}x{}".format(*default_tile(spec)), "{}x{}".format(*tiles[1])
    calls = []

    def fake_measure(ms_, mods, tgt, runner, opts):
        calls.append(len(mods))
        if len(calls) == 1:  # the first pass over every candidate: the challenger looks 20 % faster
            return [1.0 if i != 1 else 0.8 for i in range(len(mods))]
        return list(confirm)  # default, challenger, default, challenger

    monkeypatch.setattr(tune, "_measure", fake_measure)
    opts = shave.TuneOptions(trials=0, database=tmp_path, progress=False)
    ledger, result = {}, tune.TuneResult()
    got, _ = tune._choose_tiles(ms, [spec], {"kind": "llvm"}, None, opts, ledger,
                                lambda: None, result)
    assert calls == [len(tiles), 4]
    entry = next(iter(ledger.values()))
    assert entry["chosen"] == (challenger if chosen == "challenger" else default)
    assert got[spec] == tuple(int(x) for x in entry["chosen"].split("x"))
    assert result.tiles_changed == (chosen == "challenger")
    # a later compile reads the choice from the ledger without measuring
    calls.clear()
    again, _ = tune._choose_tiles(ms, [spec], {"kind": "llvm"}, None, opts, tune._load_ledger(tmp_path),
                                  lambda: None, tune.TuneResult())
    assert calls == [] and again == got
    assert "chosen" in next(iter(tune._load_ledger(tmp_path).values()))


def test_a_new_default_tile_rule_keeps_the_measured_tiles(tmp_path, monkeypatch):
    """A layer's ledger key does not depend on its default tile: after the default rule
    changes, a compile finds the layer's measured candidates (nothing measured again) and
    chooses again against the new default."""
    from tvm.s_tir import meta_schedule as ms

    from shave.backends.tvm import tune
    from shave.backends.tvm.schedules import conv

    spec = ConvSpec(1, 32, 14, 14, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", False, 8)
    tiles = conv.candidate_tiles(spec)
    fast = tiles[2]  # the fastest candidate, but within TILE_MARGIN of the first default: not chosen
    calls = []

    def fake_measure(ms_, mods, tgt, runner, opts):
        calls.append(len(mods))
        return [0.99 if t == fast else 1.0 for t in tiles]

    monkeypatch.setattr(tune, "_measure", fake_measure)
    opts = shave.TuneOptions(trials=0, database=tmp_path, progress=False)
    ledger = {}
    first, _ = tune._choose_tiles(ms, [spec], {"kind": "llvm"}, None, opts, ledger, lambda: None, tune.TuneResult())
    assert calls == [len(tiles)] and first[spec] == conv.default_tile(spec) != fast

    def new_rule(s):  # another default rule: `fast` is now the default tile
        return fast

    monkeypatch.setattr(conv, "_direct_default_tile", new_rule)
    monkeypatch.setattr(conv.Direct, "default_tile", staticmethod(new_rule))
    assert conv.default_tile(spec) == fast and conv.candidate_tiles(spec)[0] == fast
    calls.clear()
    ledger = tune._load_ledger(tmp_path)
    again, _ = tune._choose_tiles(ms, [spec], {"kind": "llvm"}, None, opts, ledger, lambda: None, tune.TuneResult())
    assert calls == [] and again[spec] == fast
    [entry] = [v for k, v in ledger.items() if k.startswith("tiles:")]
    assert entry["default"] == entry["chosen"] == "{}x{}".format(*fast)


def test_a_database_holding_lane_groups_records_opens_in_a_fresh_process(tmp_path):
    """The lane-groups kernel's default schedule, recorded in the database as the tuner records it,
    names its tensor intrinsic in the trace: a new process that has built no such kernel yet
    opens the database (reading a trace whose intrinsic is not registered fails)."""
    import subprocess
    import sys

    import tvm
    from tvm.s_tir import meta_schedule as ms

    from shave.backends.tvm.tune import _open

    spec = ConvSpec(1, 16, 8, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, "relu", False, 8, groups=4,
                    kernel="lane_groups")
    db, _ = _open(tmp_path)
    workload = tvm.IRModule({"main": compute_primfunc(spec)})
    db.commit_tuning_record(ms.database.TuningRecord(
        default_schedule(spec).trace, db.commit_workload(workload), [1e-4], tvm.target.Target(AVX2),
        ms.arg_info.ArgInfo.from_prim_func(workload["main"])))
    assert "shave_lane_groups_4x8_f32" in (tmp_path / "records.json").read_text()
    code = ("import sys; from pathlib import Path; from shave.backends.tvm.tune import _open; "
            "db, _ = _open(Path(sys.argv[1])); print(len(db))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"
