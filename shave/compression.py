"""shave.compress: the fastest artifact within an accuracy budget, chosen by latency measured on the target.

    r = shave.compress(model, (x,), evaluate, max_drop=0.01, train=batches, calibration=images)
    r.compiled(x); r.recipe; r.save_report("out/compress")

A NetAdapt-style search (Yang et al. 2018) over shave's techniques, layer by layer.

1. The per-layer table (compression_layers.py), built once on the captured model (batch
   norms kept until the end): every way to compress one layer or channel group alone --
   prune a group to 75 % or 50 % of its channels, Tucker-2 at the rank measured fastest,
   the depthwise-separable or shift rewrite of a conv -- with the time it saves measured
   on the target (its layers compiled alone, before and after; options not faster are
   left out) and the score it costs alone (after the pass's own refit, no recovery),
   scored by most time saved first; the table takes at most `TABLE_SHARE` of `time_budget`.
2. Steps: each takes the options that buy the most time per point of score lost (one
   per layer; prunes of different groups combine) until together they save
   `STEP_SAVING` of the current latency, applies them, recovers briefly (with `train`:
   a few hundred steps of `shave.finetune`, distilled from the original), scores the
   result with `evaluate` and times the whole compiled model on this machine, in rounds
   alternating with the current model (a machine's speed drifts over a search: each try is
   judged beside what it must beat, under the same conditions). The step
   is kept if the model is measurably faster (2 %) and within `short_drop` of the
   baseline score (short recoveries understate what a long one gets back: 3 x max_drop
   by default); else a second try takes half as much, and if that fails too the most
   promising option is dropped from the table. The steps end when no option is left, at
   `speedup=`, or when `time_budget` (seconds) runs out.
3. int8 last, once the steps end (also when the budget is spent: at most two candidates,
   nothing to recover): Quantize (percentile calibration unless `quantize=` says otherwise)
   with its speed check (layers kept float where their int8 kernel is slower and the whole
   model is faster so), with the target's weight range and,
   where that is the full 8 bits (VNNI, Arm's sdot), with 7-bit dense weights too (as fast
   there; sometimes more accurate). Kept on the same terms; of two good ones the faster,
   the better scored where they time within 2 %. Where int8 is fast enough but costs too
   much score, the layers most sensitive to it go back to float32 (as NNCF's accuracy
   control does), 1, 2, 4, ... of them in the order of Quantize's sensitivity (the output
   error with each layer alone int8, on the calibration data), with the better scored
   weight range, until a try is kept, is no longer faster (timed twice before that ends
   it) or the time budget runs out.

A final, longer recovery follows and must end within `max_drop`; where it does not,
the search backs off a step. Where int8 was kept, the final recovery runs on the float
model below it and int8 is applied again on top (nothing recovers an int8 model).
Measured decisions are frozen into the recipe (the groups' widths, the ranks and layers
chosen, the layers kept float), so `shave.compile(model, x, passes=result.recipe)`
replays it to the same graph without timing anything.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .compression_layers import Option, apply_options, choose, layer_options
from .errors import CompressError, ShaveError
from .ir import Graph

log = logging.getLogger("shave.compress")

TECHNIQUES = ("prune", "decompose", "rewrites", "quantize")
STEP_SAVING = 0.2  # a step's options together save this fraction of the current latency (measured per layer)
QUANTIZE = "int8 (layers measured)"
QUANTIZE_DENSE = "int8 (layers measured, 7-bit dense weights)"
QUANTIZE_PARTLY = "int8 (layers measured{dense}), the {k} most sensitive float32"
TABLE_SHARE = 0.5  # the most of time_budget that building and scoring the per-layer table may take
FASTER = 0.98  # a try must take at most this fraction of the current latency
PAIRED_ROUNDS = 3  # alternating rounds when a candidate is timed beside the current model


@dataclass
class Candidate:
    """One evaluated model: the steps that made it, its score, latency and size."""
    steps: list[str]
    score: float
    latency_ms: float
    bytes: int
    step: int  # the search step that tried it (0: the baseline)
    kept: bool = False
    note: str = ""
    reference_ms: float | None = None  # the model it had to beat, timed beside it (None: the baseline)


@dataclass
class CompressResult:
    compiled: object  # CompiledModel of the chosen graph
    graph: Graph
    score: float
    baseline_score: float
    latency_ms: float
    baseline_latency_ms: float
    recipe: list  # passes: shave.compile(model, x, passes=recipe) rebuilds the graph
    steps: list[str]  # what each kept step did, in words
    pareto: list[Candidate]  # every evaluated candidate
    message: str = ""  # why the search ended
    reference_ms: dict = field(default_factory=dict)  # e.g. {"onnxruntime": ms} on the original model
    seconds: float = 0.0
    baseline_compiled: object = None
    options: list = field(default_factory=list)  # the per-layer table (compression_layers.Option)

    @property
    def speedup(self) -> float:
        return self.baseline_latency_ms / self.latency_ms

    def __str__(self) -> str:
        lines = [f"baseline: score {self.baseline_score:.4g}, {self.baseline_latency_ms:.3f} ms",
                 f"chosen:   score {self.score:.4g}, {self.latency_ms:.3f} ms ({self.speedup:.2f}x faster)",
                 "steps:    " + (", ".join(self.steps) or "none"),
                 f"search:   {len(self.pareto)} candidates in {self.seconds:.0f} s; {self.message}"]
        for name, ms in self.reference_ms.items():
            lines.append(f"{name} on the original: {ms:.3f} ms ({ms / self.latency_ms:.2f}x the chosen latency)")
        return "\n".join(lines)

    def save_report(self, directory) -> Path:
        """Writes README.md (baseline and chosen model, the steps, every candidate, the kernels'
        time before and after) and pareto.png into `directory`; returns the markdown's path."""
        from .compression_report import write_report

        return write_report(self, Path(directory))


def _score(evaluate, graph: Graph, what: str) -> float:
    from .reference import to_torch

    try:
        value = evaluate(to_torch(graph, trainable=False))
    except Exception as e:  # the user's function: any failure is reported as one line
        raise CompressError(f"evaluate raised {type(e).__name__} on {what}: {e}") from e
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool) or math.isnan(float(value)):
        raise CompressError(f"evaluate returned {value!r} on {what}; it must return a number (higher is better)")
    return float(value)


def _latency_ms(cm, budget_s: float = 1.0) -> float:
    """Median latency of single calls of a compiled model on its example inputs (about budget_s)."""
    rt = cm._runtime
    args = rt.example_inputs()
    first = rt.benchmark(*args, repeats=5, warmup=3)["p50"]
    repeats = int(min(500, max(20, budget_s * 1e3 / max(first, 1e-3))))
    return rt.benchmark(*args, repeats=repeats, warmup=2)["p50"]


def _paired_ms(cm, ref, rounds: int = PAIRED_ROUNDS, budget_s: float = 1.0) -> tuple[float, float]:
    """(cm's, ref's) median latency, timed in `rounds` alternating rounds (about budget_s each in
    all). A machine's speed drifts over a search (a VM's slow spells took a model from 2.7 to 5.5 ms
    and back within minutes): timed beside the model it must beat, a candidate is judged under
    the same conditions, not against a figure from another time."""
    if ref is cm:
        ms = _latency_ms(cm, budget_s)
        return ms, ms
    a, b = [], []
    for _ in range(rounds):
        a.append(_latency_ms(cm, budget_s / rounds))
        b.append(_latency_ms(ref, budget_s / rounds))
    return float(np.median(a)), float(np.median(b))


def _onnxruntime_ms(model, args) -> float | None:
    """ONNX Runtime's latency on the original model with its default session options, or None."""
    try:
        import tempfile

        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as d:
            path = str(Path(d) / "model.onnx")
            torch.onnx.export(model, tuple(args), path, opset_version=17, dynamo=False)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
        for _ in range(5):
            sess.run(None, feed)
        times = []
        t_end = time.perf_counter() + 1.0
        while time.perf_counter() < t_end or len(times) < 20:
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e3
    except Exception as e:  # a reference line only: the search does not need it
        log.info("no ONNX Runtime reference: %s", e)
        return None


INT8 = {"method": "percentile"}  # the int8 step's Quantize keywords unless compress(quantize=...) says


class _Search:
    def __init__(self, baseline: Graph, args, evaluate, target, train, calibration, recovery, timer, quantize=None):
        from .recovery import Finetune

        self.baseline, self.args, self.evaluate, self.target = baseline, args, evaluate, target
        self.calibration, self.timer = calibration, timer
        self.int8 = dict(INT8 if quantize is None else quantize)
        self.recover = None
        if train is not None:
            kw = {"steps": 200, "teacher": baseline, "progress": False} | dict(recovery or {})
            self.recover = lambda: Finetune(train, **kw)

    def compile(self, graph: Graph):
        from .api import compile as shave_compile

        return shave_compile(graph, self.args, target=self.target, passes=["fold_bn"])

    def weight_ranges(self) -> list:
        """The int8 weight ranges tried: the target's own ("auto"), and where that is the full 8 bits
        (dot products that do not saturate: VNNI, sdot) also 7-bit dense weights, which run as fast
        there and can keep more of the score (Quantize's reduce_range="dense")."""
        from .passes import Quantize

        if "reduce_range" in self.int8:
            return [self.int8["reduce_range"]]
        own = Quantize(target=self.target).weight_range()
        return [own] + (["dense"] if own is False else [])

    def sensitive_layers(self, graph, reduce_range) -> list[str]:
        """The layers int8 quantizes, most sensitive first: Quantize's sensitivity, the relative
        error of the outputs with each layer alone int8 on the calibration data."""
        from .passes import FoldBN, Quantize

        kw = self.int8 | {"reduce_range": reduce_range, "max_layer_error": math.inf, "simulate": True}
        plan = Quantize(self.calibration, **kw).apply(FoldBN()(graph)).plan
        return [lq.name for lq in sorted((lq for lq in plan if lq.sensitivity is not None),
                                         key=lambda lq: -lq.sensitivity)]

    def quantize(self, graph, reduce_range, floats=()):
        """(the int8 graph, the passes that replay it); `floats`: layers kept float32 as well."""
        from .passes import FoldBN, Quantize

        kw = self.int8 | {"reduce_range": reduce_range}
        if floats:
            kw["exclude"] = list(kw.get("exclude", ())) + list(floats)
        folded = FoldBN()(graph)
        r = Quantize(self.calibration, target=self.target, timer=self.timer, **kw).apply(folded)
        floats = [lq.name for lq in r.plan if not lq.quantized]
        exclude = list(dict.fromkeys(list(kw.get("exclude", ())) + floats))
        return r.graph, [FoldBN(), Quantize(self.calibration, **kw | {"exclude": exclude})]


def compress(model, example_inputs, evaluate, *, target="x86", max_drop: float = 0.01, train=None,
             calibration=None, speedup: float | None = None, time_budget: float | None = None,
             techniques=TECHNIQUES, recovery: dict | None = None, final_recovery: dict | None = None,
             short_drop: float | None = None, reference: bool = True, timer=None,
             quantize: dict | None = None) -> CompressResult:
    """The fastest compiled model whose score is within `max_drop` of the original's (see the module doc).

    `evaluate(module) -> float` scores a callable torch module (higher is better; `max_drop` is in its
    units). `train` yields (inputs, labels) batches, or inputs alone (distillation from the original);
    without it nothing is recovered. `calibration` yields example inputs (int8 ranges, the rewrites'
    refits); without it there is no int8. `speedup`: stop once this much faster. `time_budget`: seconds
    for the table and the steps (int8 and the final recovery follow). `recovery` / `final_recovery`:
    shave.finetune arguments of the short recovery after each try (default 200 steps) and of the last
    one (default 3x longer, with the best weights kept when `validation` is given). `short_drop`: how far below the original a try may score after its short
    recovery (default 3 x max_drop with `train`, else max_drop); the final recovery must end within
    `max_drop`, else the search backs off to the step before (at most 3 tries, then the original).
    `reference`: also time ONNX Runtime on the original (report and plot). `timer`: the LayerTimer of
    the per-layer table and int8's per-layer choice (shave.layer_timer(cache="layers.json") keeps the
    measurements across runs); whole models are timed here. `quantize`: Quantize keywords of the int8
    step (default {"method": "percentile"}, the calibration bench-quantize found closest to float32 on
    MobileNetV2; with "reduce_range" only that weight range is tried)."""
    from .frontend.capture import _normalise_inputs, capture, eval_model
    from .recovery import Finetune

    t_start = time.perf_counter()
    unknown = [t for t in techniques if t not in TECHNIQUES]
    if unknown:
        raise CompressError(f"unknown technique {unknown[0]!r}; known: {', '.join(TECHNIQUES)}")
    if not callable(evaluate):
        raise CompressError(f"evaluate must be a function module -> score, got {type(evaluate).__name__}")
    if max_drop < 0:
        raise CompressError(f"max_drop must be >= 0, got {max_drop!r}")
    if isinstance(model, Graph):
        graph = model.copy()
        args = _normalise_inputs(example_inputs) if example_inputs is not None else None
        torch_model = None
    else:
        torch_model = eval_model(model)
        args = _normalise_inputs(example_inputs)
        graph = capture(torch_model, args)
    search = _Search(graph, args, evaluate, target, train, calibration, recovery, timer, quantize)

    base_score = _score(evaluate, graph, "the original model")
    base_cm = search.compile(graph)
    if not base_cm.runs_here:
        raise CompressError(f"compress times candidates on this machine, and target {target!r} is another one")
    base_ms = _latency_ms(base_cm)
    refs = {}
    if reference and torch_model is not None:
        ort_ms = _onnxruntime_ms(torch_model, args)
        if ort_ms is not None:
            refs["onnxruntime"] = ort_ms
    log.info("baseline: score %.4g, %.3f ms", base_score, base_ms)
    pareto = [Candidate([], base_score, base_ms, graph.stats()["bytes"], 0, kept=True)]
    current = _State(graph, [], [], base_score, base_ms, base_cm, final=True)
    kept = [current]
    short_drop = (3 * max_drop if train is not None else max_drop) if short_drop is None else short_drop
    message, step = "", 0
    table: list[Option] = []
    best = lambda: _result(current, base_score, base_ms, pareto, refs, message, t_start, base_cm, table)  # noqa: E731

    def out_of_time(share: float = 1.0) -> bool:
        return time_budget is not None and time.perf_counter() - t_start > share * time_budget

    def table_time_spent() -> bool:
        return out_of_time(TABLE_SHARE)

    eps = 1e-3 * max(abs(base_score), 1e-9)  # the least score loss a step is charged

    def attempt(step: int, label: str, make, recover: bool = True) -> tuple | None:
        """Build, recover (unless `recover` is False), score, compile and time one candidate from the
        current model: -> (candidate, graph, passes, compiled) and recorded in the Pareto list, or
        None where the passes do not apply."""
        t0 = time.perf_counter()
        try:
            g, passes = make(current.graph)
        except ShaveError as e:
            log.info("step %d: %s does not apply: %s", step, label, e)
            return None
        if search.recover is not None and recover:
            rec = search.recover()
            g = rec(g)
            passes = passes + [rec]
        score = _score(evaluate, g, f"step {step} ({label})")
        cm = search.compile(g)
        ms, ref_ms = _paired_ms(cm, current.cm)
        cand = Candidate(current.steps + [label], score, ms, g.stats()["bytes"], step, reference_ms=ref_ms)
        pareto.append(cand)
        log.info("step %d: %s -> score %.4g, %.3f ms (%.0f s)", step, label, score, cand.latency_ms,
                 time.perf_counter() - t0)
        return cand, g, passes, cm

    def reached() -> bool:
        return speedup is not None and base_ms / current.ms >= speedup

    def faster(cand: Candidate) -> bool:
        """Faster than the current model, as timed beside it (attempt)."""
        return cand.latency_ms <= FASTER * (cand.reference_ms or current.ms)

    def good(cand: Candidate) -> bool:
        return faster(cand) and cand.score >= base_score - short_drop

    try:
        # the per-layer table: each option's measured saving and its score cost alone
        # scored by most time saved first: where the table's share of the budget runs out, the
        # options left unscored are those that save least
        options = sorted(layer_options(graph, techniques, target, calibration, timer, stop=table_time_spent),
                         key=lambda o: -o.saving_ms)
        for o in tqdm(options, desc="compress: layer sensitivity", unit="option", leave=False, disable=None):
            if table_time_spent():
                log.info("the table's share of the time budget is spent: %d options unscored",
                         len(options) - options.index(o))
                break
            try:
                g, _ = apply_options(graph, [o], target, calibration)
            except ShaveError as e:
                log.info("option %s does not apply: %s", o.label, e)
                continue
            o.drop = base_score - _score(evaluate, g, f"option {o.label!r} alone")
            table.append(o)
            log.info("option %s: saves %.4f ms, loses %.4g alone", o.label, o.saving_ms, o.drop)
        log.info("per-layer table: %d options (%.0f s)", len(table), time.perf_counter() - t_start)
        remaining = list(table)
        # NetAdapt-style steps: the options that buy the most time per point lost, together
        # saving STEP_SAVING of the current latency (half that on a second try), recovered,
        # scored and timed as a whole model
        while remaining and not out_of_time():
            if reached():
                break
            step += 1
            kept_step = None
            tried: list = []
            for frac in (1.0, 0.5):
                chosen = choose(remaining, frac * STEP_SAVING * current.ms, eps)
                if chosen in tried or out_of_time():
                    continue
                tried.append(chosen)
                label = "; ".join(o.label for o in chosen)
                got = attempt(step, label, lambda g, c=chosen: apply_options(g, c, target, calibration))
                if got is not None and good(got[0]):
                    kept_step = (got, chosen, label)
                    break
            if kept_step is None:  # the most promising option costs too much: go on without it
                remaining.remove(tried[-1][0] if tried else remaining[0])
                continue
            (cand, g, passes, cm), chosen, label = kept_step
            cand.kept = True
            for o in chosen:
                o.step = step
            remaining = [o for o in remaining if o not in chosen and not any(o.conflicts(c) for c in chosen)]
            current = _State(g, current.recipe + passes, current.steps + [label], cand.score, cand.latency_ms, cm,
                             final=search.recover is None)
            kept.append(current)
        # int8 last, after the budget's steps (nothing to recover): each weight range the target
        # allows; the fastest good one, the best scored where they time alike; where none is good
        # but one is fast enough, the most sensitive layers float32, doubling, until one is good
        if "quantize" in techniques and calibration is not None and not reached():
            step += 1
            tries, fast = [], []
            for i, rr in enumerate(search.weight_ranges()):
                label = QUANTIZE if i == 0 else QUANTIZE_DENSE
                got = attempt(step, label, lambda g, rr=rr: search.quantize(g, rr), recover=False)
                if got is not None and good(got[0]):
                    tries.append((label, got))
                elif got is not None and faster(got[0]):
                    fast.append((got[0].score, i, rr))
            if not tries and fast and not out_of_time():
                # fast enough but beyond the score budget: the most sensitive layers back to float32
                _, i, rr = max(fast, key=lambda t: (t[0], -t[1]))  # the better scored; the first of equals
                order = search.sensitive_layers(current.graph, rr)
                k = 1
                while k < len(order) and not out_of_time():
                    label = QUANTIZE_PARTLY.format(k=k, dense=", 7-bit dense weights" if i else "")
                    got = attempt(step, label, lambda g, f=order[:k]: search.quantize(g, rr, f), recover=False)
                    if got is not None and not faster(got[0]):
                        # noise only ever adds time: timed beside the current model once more before stopping
                        ms, ref = _paired_ms(got[3], current.cm)
                        if ms / ref < got[0].latency_ms / got[0].reference_ms:
                            got[0].latency_ms, got[0].reference_ms = ms, ref
                    if got is None or not faster(got[0]):
                        break  # more float32 layers only get slower
                    if good(got[0]):
                        tries.append((label, got))
                        break
                    k *= 2
            if tries:
                label, (cand, g, passes, cm) = tries[_pick([got[0] for _, got in tries])]
                cand.kept = True
                current = _State(g, current.recipe + passes, current.steps + [label], cand.score, cand.latency_ms,
                                 cm, final=True, int8=passes, below=current)
                kept.append(current)
        message = ("time budget spent" if out_of_time() else
                   f"reached {speedup:g}x" if reached() else
                   "no option left that is faster within max_drop")
    except CompressError as e:
        raise CompressError(str(e), best()) from e

    # the final recovery, from the last kept step back (at most 3 tries) to one within max_drop;
    # int8 kept on a briefly recovered model: the float model below it recovers, then int8 again
    recovered: dict = {}

    def final(state: _State) -> _State:
        if state.final and state.int8 and state.below is not None and not state.below.final:
            below = final(state.below)
            g = below.graph
            for p in state.int8:
                g = p(g)
            cm = search.compile(g)
            return _State(g, below.recipe + state.int8, below.steps + state.steps[-1:],
                          _score(evaluate, g, "int8 after the final recovery"), _latency_ms(cm), cm, final=True)
        if state.final:
            return state
        if id(state) not in recovered:
            kw = {"teacher": graph} | dict(final_recovery or {})
            if not {"steps", "epochs", "seconds"} & set(kw):
                kw["steps"] = 3 * (recovery or {}).get("steps", 200)
            rec = Finetune(train, **kw)
            g = rec(state.graph)
            score = _score(evaluate, g, "the final recovery")
            cm = search.compile(g)
            recovered[id(state)] = _State(g, state.recipe + [rec], state.steps + ["final recovery"], score,
                                          _latency_ms(cm), cm, final=True)
        return recovered[id(state)]

    for state in reversed(kept[-3:]):
        state = final(state)
        if state.score >= base_score - max_drop:
            current = state
            break
        message += f"; {' + '.join(state.steps)} ended at {state.score:.4g}, beyond max_drop"
    else:
        current = kept[0]
    if speedup is not None and base_ms / current.ms < speedup:
        log.warning("compress: %.2fx is the fastest within max_drop=%g, short of speedup=%g",
                    base_ms / current.ms, max_drop, speedup)
        message += f"; short of speedup={speedup:g}"
    return best()


def _pick(cands: list[Candidate]) -> int:
    """Index of the candidate to keep among good ones: the best scored of those that time within
    2 % of the fastest (the first of equals)."""
    fastest = min(c.latency_ms for c in cands)
    near = [i for i, c in enumerate(cands) if FASTER * c.latency_ms <= fastest]
    return max(near, key=lambda i: (cands[i].score, -i))


@dataclass
class _State:
    graph: Graph
    recipe: list
    steps: list
    score: float
    ms: float
    cm: object
    final: bool = False  # its score is final (recovered, int8, or nothing to recover with)
    int8: list | None = None  # the int8 passes, where it is the int8 step on top of `below`
    below: "_State | None" = None


def _result(state: _State, base_score, base_ms, pareto, refs, message, t_start, base_cm, table) -> CompressResult:
    """The result; the chosen model and the baseline are timed once more, beside each other, for
    its latencies (the search's figures come from different moments)."""
    from .passes import FoldBN

    ms, base_ms = _paired_ms(state.cm, base_cm) if state.cm is not base_cm else (state.ms, base_ms)
    return CompressResult(compiled=state.cm, graph=state.graph, score=state.score, baseline_score=base_score,
                          latency_ms=ms, baseline_latency_ms=base_ms, recipe=state.recipe + [FoldBN()],
                          steps=list(state.steps), pareto=list(pareto), message=message, reference_ms=dict(refs),
                          seconds=time.perf_counter() - t_start, baseline_compiled=base_cm, options=list(table))
