"""Tuning the conv kernels on the target, with a persistent database.

Two stages, both measured with MetaSchedule's builder and runner (locally, or
on devices registered with a TVM RPC tracker: `TuneOptions(rpc="host:port/key")`;
the builder stays here, cross-compiling for the target):

1. Tile search. The default conv schedule (schedules/conv.py) has one free
   choice a hand rule makes: the register tile (output-channel blocks x output
   columns held in registers). For every conv layer, each candidate tile of
   `candidate_tiles` is built with the default schedule and measured; the
   fastest is used. A few candidates per layer, so this costs a few builds per
   layer, not a search. Timings on a shared machine have bursts: each
   candidate counts its fastest repeat, and a tile other than the default must
   win by TILE_MARGIN, then win again in a second, interleaved measurement of
   the two (default, challenger, default, challenger), or the default stays.
2. MetaSchedule. Each conv kernel (with its chosen tile) is a MetaSchedule
   task: the workload is its unscheduled PrimFunc, the design space
   MetaSchedule's own (multi-level tiling, parallel/vectorise/unroll, compute
   location). Before a task is searched, the default schedule is measured
   with the same runner and committed as an ordinary record (its trace
   replays the default schedule), so the build takes the fastest record of
   every workload: never slower than the default *as measured*.

The database is a directory: MetaSchedule's JSON database (workloads.json,
records.json) plus `shave-tasks.json`, which records each layer's measured
tiles and which workloads were searched with what per-task budget. A later
compile whose layers are all there (with at least the budget asked for) does
not measure anything; it reads the choices and the best records.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import CompileError

LEDGER = "shave-tasks.json"
KEY_TILE = (1, 1)  # the register tile a layer's ledger key is computed at (any valid tile names the layer)
TILE_MARGIN = 0.97  # a non-default tile must take at most this fraction of the default's time, twice


@dataclass
class TuneOptions:
    """How to tune. `trials`: MetaSchedule candidates to measure in all, across the
    model's conv kernels, after the tile search (0: tile search only);
    `database`: a directory, created if missing, reused across compiles and models;
    `trials_per_task`: MetaSchedule cap per kernel (default: 2 x an even share, at least 8);
    `rpc`: "host:port/key" of a TVM RPC tracker to measure on its devices (default: here);
    `progress`: show a progress bar on stderr."""
    trials: int = 64
    database: str | Path = "shave-tuning"
    trials_per_task: int | None = None
    rpc: str | None = None
    progress: bool = True
    timeout_s: float = 60.0
    trials_per_iter: int = 16
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.trials, int) or self.trials < 0:
            raise CompileError(f"TuneOptions.trials must be an int >= 0, got {self.trials!r}")
        if self.trials_per_task is not None and (not isinstance(self.trials_per_task, int) or self.trials_per_task < 1):
            raise CompileError(f"TuneOptions.trials_per_task must be an int >= 1, got {self.trials_per_task!r}")
        if self.rpc is not None:
            _parse_rpc(self.rpc)
        self.database = Path(self.database)


@dataclass
class TuneResult:
    """What tuning did, for the compile report."""
    tasks: int = 0
    tuned_now: int = 0
    tiles_measured: int = 0  # tile candidates measured now (stage 1)
    tiles_changed: int = 0  # layers whose tile differs from the default plan
    trials: int = 0  # MetaSchedule candidates measured now (stage 2)
    seconds: float = 0.0
    default_ms: float = 0.0  # estimated conv time of the model: sum over kernels of calls x latency
    tuned_ms: float = 0.0
    # (name, calls, default tile us, chosen tile us, best us, tile): single-kernel timings on the runner
    kernels: list = field(default_factory=list)

    def summary(self) -> str:
        if not self.tasks:
            return "tune: no conv kernels to tune"
        speed = self.default_ms / self.tuned_ms if self.tuned_ms else float("nan")
        return (f"tune: {self.tasks} conv kernels, {self.tiles_changed} with a non-default tile; measured now: "
                f"{self.tiles_measured} tile candidates, {self.trials} MetaSchedule trials on {self.tuned_now} "
                f"kernels ({self.seconds:.0f} s); conv time {self.default_ms:.2f} ms default -> "
                f"{self.tuned_ms:.2f} ms tuned ({speed:.2f}x)")


def _parse_rpc(spec: str, what: str = "TuneOptions.rpc") -> tuple[str, int, str]:
    try:
        hostport, key = spec.rsplit("/", 1)
        host, port = hostport.rsplit(":", 1)
        if not host or not key:
            raise ValueError
        return host, int(port), key
    except ValueError:
        raise CompileError(f"{what} must be 'host:port/key' of a TVM RPC tracker, got {spec!r}") from None


def light_tensor_intrin(target_family: str = "x86") -> None:
    """Make `import tvm.s_tir.tensor_intrin` cheap in this process.

    MetaSchedule imports that package in every TuneContext and every builder
    worker; its __init__ registers the intrinsics of every backend, which
    takes 20-60 s here (and trips the builder's timeout). We register only the
    target family's intrinsics (a module placeholder stands in for the package)."""
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__package__ = name
        sys.modules[name] = pkg
    try:
        importlib.import_module(f"{name}.{target_family}")
    except Exception:
        pass


def _builder_init():
    import tvm  # noqa: F401
    light_tensor_intrin("x86")


def _family(target: dict) -> str:
    triple = str(target.get("mtriple", ""))
    if triple.startswith(("aarch64", "arm")):
        return "arm_cpu"
    return "x86"


def _load_ledger(d: Path) -> dict:
    try:
        return json.loads((d / LEDGER).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CompileError(f"tuning database {d}: unreadable {LEDGER} ({e})") from None


def _key(workload, target: dict) -> str:
    """Ledger key: the workload's structural hash and the target."""
    import hashlib

    import tvm_ffi

    tag = hashlib.sha256(json.dumps(target, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{tvm_ffi.structural_hash(workload) & 0xFFFFFFFFFFFFFFFF:016x}:{tag}"


def _count_calls(mod) -> dict[str, int]:
    """{PrimFunc name: number of call_tir sites} over the Relax functions of `mod`."""
    from tvm import relax

    counts: dict[str, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            gv = expr.args[0]
            counts[gv.name_hint] = counts.get(gv.name_hint, 0) + 1

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def tune_module(make_mod, target: dict, opts: TuneOptions):
    """Schedule and tune the Relax module `make_mod(kernels, tiles)` (a fresh module each call,
    lowered with those conv tiles, filling `kernels` with its conv kernels: lower.to_relax) for
    `target`. Returns (the scheduled module, TuneResult)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .schedules import schedule_module

    t0 = time.perf_counter()
    light_tensor_intrin(_family(target))
    tgt = tvm.target.Target(target)
    db, ledger = _open(opts.database)
    kernels: dict = {}
    mod = schedule_module(make_mod(kernels, None), target)
    result = TuneResult()
    runner = None

    def get_runner():
        nonlocal runner
        runner = runner or _runner(opts)
        return runner

    tiles, stage1 = _choose_tiles(ms, list(kernels), target, tgt, opts, ledger, get_runner, result)
    if result.tiles_changed:
        kernels = {}
        mod = schedule_module(make_mod(kernels, tiles), target)
    mod = _search(ms, mod, kernels, target, tgt, opts, db, ledger, get_runner, result, stage1)
    result.seconds = time.perf_counter() - t0
    return mod, result


def _open(d: Path):
    from tvm.s_tir import meta_schedule as ms

    from .schedules import lane_groups

    # the records' traces name the tensor intrinsics they tensorize: reading them needs those registered
    lane_groups.register_intrinsics()
    try:
        d.mkdir(parents=True, exist_ok=True)
        db = ms.database.JSONDatabase(path_workload=str(d / "workloads.json"),
                                      path_tuning_record=str(d / "records.json"), allow_missing=True)
    except Exception as e:
        raise CompileError(f"tuning database {d}: cannot open ({_last_line(e)})") from None
    return db, _load_ledger(d)


def _tile_key(spec, target: dict) -> str:
    """Ledger key of a layer's tile search: its workload at KEY_TILE, not at its default tile, so
    the tiles measured stay valid when the default rule changes."""
    return "tiles:" + _key(_workload(dataclasses.replace(spec, tile=KEY_TILE)), target)


def _workload(spec):
    import tvm

    from .schedules.conv import compute_primfunc

    return tvm.IRModule({"main": compute_primfunc(spec).with_attr("global_symbol", "main")})


def _choose_tiles(ms, specs, target, tgt, opts, ledger, get_runner, result):
    """Stage 1: {spec: best tile} over candidate_tiles, measured once per layer and kept
    in the ledger; also ({spec: seconds of the default tile}, {spec: seconds of the chosen tile})."""
    from .schedules.conv import candidate_tiles, default_schedule, default_tile

    todo = []  # (spec, key, tile)
    errors: dict = {}  # spec -> why its default tile failed to run
    keys = {spec: _tile_key(spec, target) for spec in specs}
    defaults = {spec: _tile_name(default_tile(spec)) for spec in specs}
    for spec, key in keys.items():
        entry = ledger.setdefault(key, {"candidates": {}})
        new = [t for t in candidate_tiles(spec) if _tile_name(t) not in entry["candidates"]]
        todo += [(spec, key, t) for t in new]
        # a new candidate, or a choice made against another default rule's tile: choose again
        if new or entry.get("default") != defaults[spec]:
            entry.pop("chosen", None)
            entry.pop("confirm", None)
            entry["default"] = defaults[spec]
    if todo:
        secs = _measure(ms, [default_schedule(dataclasses.replace(sp, tile=t)).mod for sp, _, t in todo],
                        tgt, get_runner(), opts)
        result.tiles_measured = len(todo)
        for (spec, key, tile), sec in zip(todo, secs):
            ledger[key]["candidates"][_tile_name(tile)] = sec if not isinstance(sec, str) else None
            if isinstance(sec, str) and _tile_name(tile) == defaults[spec]:
                errors[spec] = sec
        _save_ledger(opts.database, ledger)
    for spec in specs:
        entry = ledger[keys[spec]]
        if entry["default"] not in _timed(entry):
            raise CompileError(f"tuning: the default schedule of a {spec.kh}x{spec.kw} conv failed on the tuning "
                               f"runner ({errors.get(spec, 'no timing recorded in the database')})")
    _confirm_tiles(ms, specs, keys, ledger, tgt, opts, get_runner)
    tiles, default_s, chosen_s = {}, {}, {}
    for spec in specs:
        entry = ledger[keys[spec]]
        timed = _timed(entry)
        best = entry.get("chosen", min(timed, key=timed.get))  # ledgers written before "chosen": the fastest
        default_s[spec] = timed[entry["default"]]
        chosen_s[spec] = timed[best]
        tiles[spec] = _tile_of(best)
        result.tiles_changed += best != entry["default"]
    return tiles, (default_s, chosen_s)


def _tile_name(tile: tuple[int, int]) -> str:
    """A register tile as the ledger names it: "2x4"."""
    return "{}x{}".format(*tile)


def _tile_of(name: str) -> tuple[int, int]:
    ocb_in, reg_n = name.split("x")
    return int(ocb_in), int(reg_n)


def _timed(entry: dict) -> dict:
    """{tile: seconds} of a ledger entry's candidates that ran."""
    return {k: v for k, v in entry["candidates"].items() if v is not None}


def _confirm_tiles(ms, specs, keys, ledger, tgt, opts, get_runner) -> None:
    """Set each new ledger entry's "chosen" tile: the default, unless the fastest candidate
    took at most TILE_MARGIN of its time both in the first measurement and in a second one
    of the two, interleaved (a burst of load during one measurement cannot pick a tile)."""
    from .schedules.conv import default_schedule

    duel = []  # (spec, entry, challenger)
    decided = 0
    for spec in specs:
        entry = ledger[keys[spec]]
        if "chosen" in entry or "candidates" not in entry:
            continue
        timed = _timed(entry)
        best = min(timed, key=timed.get)
        if best != entry["default"] and timed[best] <= TILE_MARGIN * timed[entry["default"]]:
            duel.append((spec, entry, best))
        else:
            entry["chosen"] = entry["default"]
            decided += 1
    if not duel:
        if decided:
            _save_ledger(opts.database, ledger)
        return
    mods = []
    for spec, entry, best in duel:
        for t in (entry["default"], best) * 2:
            mods.append(default_schedule(dataclasses.replace(spec, tile=_tile_of(t))).mod)
    secs = _measure(ms, mods, tgt, get_runner(), opts)
    for i, (spec, entry, best) in enumerate(duel):
        d0, b0, d1, b1 = secs[4 * i:4 * i + 4]
        ok = not any(isinstance(x, str) for x in (d0, b0, d1, b1))
        entry["confirm"] = {entry["default"]: [d0, d1] if ok else None, best: [b0, b1] if ok else None}
        entry["chosen"] = best if ok and max(b0, b1) <= TILE_MARGIN * min(d0, d1) else entry["default"]
    _save_ledger(opts.database, ledger)


def _search(ms, mod, kernels, target, tgt, opts, db, ledger, get_runner, result, stage1):
    """Stage 2: MetaSchedule on each kernel, the default schedule committed as a record;
    `mod` with every kernel replaced by its best record."""
    import tvm

    from .schedules.conv import default_schedule, restore_shapes

    calls = _count_calls(mod)
    present = {g.name_hint for g in mod.get_global_vars()}
    tasks = []  # (name, gv, spec, workload IRModule, key, calls)
    for spec, gv in kernels.items():
        if gv.name_hint not in present:
            continue
        workload = _workload(spec)
        tasks.append((gv.name_hint, mod.get_global_var(gv.name_hint), spec, workload, _key(workload, target),
                      calls.get(gv.name_hint, 1)))
    result.tasks = len(tasks)
    if not tasks:
        return mod

    # the default schedule of every kernel not seen before, measured and recorded
    fresh = [t for t in tasks if t[4] not in ledger]
    if fresh:
        schedules = [default_schedule(t[2]) for t in fresh]
        secs = _measure(ms, [sch.mod for sch in schedules], tgt, get_runner(), opts)
        for t, sch, sec in zip(fresh, schedules, secs):
            if isinstance(sec, str):
                raise CompileError(f"tuning: the default schedule of {t[0]} failed on the tuning runner ({sec})")
            db.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, db.commit_workload(t[3]), [sec], tgt,
                ms.arg_info.ArgInfo.from_prim_func(t[3]["main"])))
            ledger[t[4]] = {"name": t[0], "default_s": sec, "budget": 0}
        _save_ledger(opts.database, ledger)

    per_task = opts.trials_per_task or max(8, math.ceil(2 * opts.trials / len(tasks)))
    todo = [t for t in tasks if ledger[t[4]].get("budget", 0) < per_task] if opts.trials else []
    if todo:
        from ...runtime.quiet import quiet_tvm

        progress = _Progress(todo, ledger, opts.trials, opts.progress)
        contexts = [ms.TuneContext(
            mod=t[3], target=tgt, space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(population_size=256, init_min_unmeasured=32,
                                                                  genetic_num_iters=3),
            task_name=t[0], rand_state=opts.seed + i, num_threads="physical") for i, t in enumerate(todo)]
        try:
            with quiet_tvm():
                ms.tune.tune_tasks(
                    tasks=contexts, task_weights=[float(t[5]) for t in todo], work_dir=str(opts.database / "logs"),
                    max_trials_global=max(opts.trials, len(todo)), max_trials_per_task=per_task,
                    num_trials_per_iter=opts.trials_per_iter,
                    builder=ms.builder.LocalBuilder(timeout_sec=opts.timeout_s, initializer=_builder_init),
                    runner=get_runner(), database=db,
                    measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress.callback(ms)],
                    cost_model=ms.cost_model.XGBModel(num_tuning_cores=2),
                )
        finally:
            progress.close()
        result.trials = progress.done
        result.tuned_now = len(todo)
        for t in todo:
            ledger[t[4]]["budget"] = per_task
        _save_ledger(opts.database, ledger)

    # the best record of every workload
    for name, gv, spec, workload, key, n in tasks:
        tiled_s = ledger[key]["default_s"]
        best_s = tiled_s
        top = db.get_top_k(db.commit_workload(workload), 1)
        if top:
            run = [float(x) for x in top[0].run_secs]
            # its mean against the default's fastest repeat, with the tile search's margin
            if sum(run) / len(run) < TILE_MARGIN * tiled_s:
                sch = tvm.s_tir.Schedule(workload)
                try:
                    top[0].trace.apply_to_schedule(sch, remove_postproc=False)
                    func = restore_shapes(spec, sch.mod["main"])
                    old = mod[gv]
                    for k in ("global_symbol", "op_pattern"):
                        if old.attrs and k in old.attrs:
                            func = func.with_attr(k, old.attrs[k])
                    mod[gv] = func.with_attr("tirx.is_scheduled", True)
                    best_s = sum(run) / len(run)
                except Exception:
                    pass
        # estimates in stage 1's timings (default and chosen tile timed in one session);
        # a MetaSchedule gain is its ratio to the default it beat (timed in one session too)
        base_spec = dataclasses.replace(spec, tile=None)
        base = stage1[0].get(base_spec, tiled_s)
        chosen = stage1[1].get(base_spec, tiled_s)
        best = chosen * best_s / tiled_s if best_s < tiled_s else chosen
        result.kernels.append((name, n, base * 1e6, chosen * 1e6, best * 1e6, list(spec.tile or [])))
        result.default_ms += n * base * 1e3
        result.tuned_ms += n * best * 1e3
    return mod


def _save_ledger(d: Path, ledger: dict) -> None:
    tmp = d / (LEDGER + ".tmp")
    tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
    tmp.replace(d / LEDGER)


def _runner(opts: TuneOptions):
    from tvm.s_tir import meta_schedule as ms

    cfg = ms.runner.EvaluatorConfig(number=3, repeat=5, min_repeat_ms=30, enable_cpu_cache_flush=False)
    if opts.rpc:
        host, port, key = _parse_rpc(opts.rpc)
        _check_tracker(host, port, key)
        return ms.runner.RPCRunner(rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                                                  tracker_key=key, session_timeout_sec=int(opts.timeout_s)),
                                   evaluator_config=cfg, max_workers=1)
    return ms.runner.LocalRunner(timeout_sec=opts.timeout_s, evaluator_config=cfg)


def _check_tracker(host: str, port: int, key: str, what: str = "tuning") -> None:
    """Fail now, with the reason, rather than wait forever for a device that is not there."""
    from tvm import rpc

    try:
        queues = rpc.connect_tracker(host, port).summary().get("queue_info", {})
    except Exception as e:
        raise CompileError(f"{what}: cannot reach the RPC tracker at {host}:{port} ({_last_line(e)})") from None
    if key not in queues:
        raise CompileError(f"{what}: no device with key {key!r} is registered at the RPC tracker {host}:{port} "
                           f"(keys there: {', '.join(sorted(queues)) or 'none'})")


def _measure(ms, mods, tgt, runner, opts) -> list[float | str]:
    """Seconds of each scheduled module on the runner, its fastest repeat (the error message
    where it failed)."""
    builder = ms.builder.LocalBuilder(timeout_sec=opts.timeout_s, initializer=_builder_init)
    built = builder.build([ms.builder.BuilderInput(m, tgt) for m in mods])
    out: list[float | str] = [""] * len(mods)
    inputs, where = [], []
    for i, (m, b) in enumerate(zip(mods, built)):
        if b.error_msg is None:
            inputs.append(ms.runner.RunnerInput(b.artifact_path, "cpu" if tgt.kind.name == "llvm" else tgt.kind.name,
                                                ms.arg_info.ArgInfo.from_prim_func(m["main"])))
            where.append(i)
        else:
            out[i] = f"build: {_last_line(b.error_msg)}"
    for i, fut in zip(where, runner.run(inputs)):
        r = fut.result()
        if r.error_msg is None and r.run_secs:
            out[i] = min(float(s) for s in r.run_secs)
        else:
            out[i] = f"run: {_last_line(r.error_msg or 'no timings')}"
    return out


def _last_line(msg: str) -> str:
    lines = [ln for ln in str(msg).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "?"


class _Progress:
    """tqdm bar over measured trials; postfix: estimated conv time of the tuned kernels."""

    def __init__(self, todo, ledger, total, enabled):
        from tqdm import tqdm

        self.names = [t[0] for t in todo]
        self.calls = [t[5] for t in todo]
        self.best = [ledger[t[4]]["default_s"] for t in todo]
        self.start = sum(c * b for c, b in zip(self.calls, self.best))
        self.done = 0
        self.bar = tqdm(total=total, unit="trial", desc="tuning", disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True)
        self._postfix()

    def _postfix(self):
        now = sum(c * b for c, b in zip(self.calls, self.best))
        self.bar.set_postfix_str(f"conv time {self.start * 1e3:.2f} -> {now * 1e3:.2f} ms")

    def callback(self, ms):
        from tvm.ir.utils import derived_object

        prog = self

        @derived_object
        class _Callback(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                for r in runner_results:
                    if r.error_msg is None and r.run_secs:
                        secs = [float(s) for s in r.run_secs]
                        prog.best[task_id] = min(prog.best[task_id], sum(secs) / len(secs))
                n = len(measure_candidates)
                prog.done += n
                if prog.done > prog.bar.total:  # the scheduler may finish its last batch past the budget
                    prog.bar.total = prog.done
                prog.bar.update(n)
                prog._postfix()

        return _Callback()

    def close(self):
        self.bar.close()
