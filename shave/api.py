"""shave.compile(): capture -> passes -> lower -> CompiledModel."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .backends.tvm.build import build
from .backends.tvm.tune import TuneOptions
from .target import required_features, resolve_target, target_arch
from .errors import CaptureError, CompileError, TargetError
from .frontend.capture import _normalise_inputs, capture, eval_model
from .isa import compiling_for, isa
from .ir import Graph, verify
from .ir.rebatch import batch_of, rebatch
from .ir.serialize import IR_MEMBER, graph_bytes
from .passes import DEFAULT_PASSES, get_pass, pass_list, run_passes, run_probes
from .passes.instruments import exact_check_tolerance
from .reference import run_graph
from .runtime.report import Report, exact_tolerance, relative_error
from .runtime.artifact import DEVICE_SOURCE, LIB, write_artifact
from .runtime.module import Runtime, load_library, target_mismatch
from .runtime.launcher import MEMBER as LAUNCHER_MEMBER, build_launcher, host_launcher

log = logging.getLogger("shave")

BUILD_TOLERANCE = 1e-4  # compiled code vs the IR it was built from, relative to output scale


def build_tolerance(graph: Graph) -> float:
    """How far compiled code may be from the IR it was built from (see INT8_BOUNDARY_TOLERANCE)."""
    return exact_tolerance(graph, BUILD_TOLERANCE)


def _probes(args: tuple[torch.Tensor, ...]) -> list[tuple[np.ndarray, ...]]:
    """The example inputs, plus one random input of the same shape and scale."""
    gen = torch.Generator().manual_seed(0)
    rand = []
    for x in args:
        if x.is_floating_point():
            std = float(x.float().std()) if x.numel() > 1 else 1.0
            rand.append((torch.randn(x.shape, generator=gen) * (std or 1.0) + float(x.float().mean())).to(x.dtype))
        else:
            rand.append(x)
    return [tuple(a.numpy() for a in args), tuple(a.numpy() for a in rand)]


def _model_outputs(model, probes) -> list[np.ndarray]:
    outs = []
    with torch.no_grad():
        for p in probes:
            y = model(*[torch.from_numpy(a) for a in p])
            outs += [t.detach().cpu().numpy() for t in torch.utils._pytree.tree_leaves(y)
                     if isinstance(t, torch.Tensor)]
    return outs


class CompiledModel:
    """The result of shave.compile: callable, with a report and an export to one file."""

    def __init__(self, graph: Graph, library: bytes, manifest: dict, report: Report):
        self.graph = graph
        self.report = report
        self.manifest = manifest
        self._library = library  # the exported shared library, exactly as the artifact will hold it
        self._not_here = target_mismatch(manifest["target"])
        if not self._not_here:
            host_launcher()  # the kernels' parallel loops on shave's launcher (runtime/launcher.py)
        self._runtime = None if self._not_here else Runtime(load_library(library), manifest)
        self.tuning = None  # a TuneResult when compiled with tune=

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    @property
    def threads(self) -> int | None:
        """Threads one call runs on (default: every CPU the process may use; see shave.Runtime)."""
        return self._runtime.threads if self._runtime is not None else None

    @threads.setter
    def threads(self, n: int | None) -> None:
        if self._runtime is not None:
            self._runtime.threads = n

    @property
    def runs_here(self) -> bool:
        """Whether this machine can run the compiled code (False for aarch64 or CUDA code built here)."""
        return self._runtime is not None

    @property
    def device_source(self) -> str | None:
        """The CUDA C the GPU kernels were compiled from (None for CPU targets)."""
        return getattr(self._library, "device_source", None)

    @property
    def target(self) -> dict:
        return self.manifest["target"]["dict"]

    def __call__(self, *inputs, **named):
        """The outputs for inputs by position and/or by name (`input_names`): torch tensors in,
        torch tensors out; numpy in, numpy out."""
        if self._runtime is None:
            raise TargetError(f"this compiled model cannot run here: {self._not_here}")
        inputs = self._runtime.bind(inputs, named)
        if all(type(x) is np.ndarray for x in inputs):  # numpy in, numpy out (0.4 us less a call)
            outs = self._runtime.run(*inputs)
        else:
            as_torch = any(isinstance(x, torch.Tensor) for x in inputs)
            outs = self._runtime.run(*_as_arrays(inputs))
            if as_torch:
                outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def profile(self, *inputs, repeats: int = 10):
        """Where a call's time goes, kernel by kernel: a shave.runtime.profile.Profile (print it)."""
        if self._runtime is None:
            raise TargetError(f"this compiled model cannot run here: {self._not_here}")
        return self._runtime.profile(*_as_arrays(inputs), repeats=repeats)

    def export(self, path, include_ir: bool = False) -> Path:
        """Write the artifact (one file) that shave.load() runs without torch. `include_ir`: also
        keep the compiled IR graph in it, so that shave.load_graph(path) (or `shave compile
        ARTIFACT --target ...`) can build it again for another target without the model."""
        members = {LIB: bytes(self._library)}
        if include_ir:
            members[IR_MEMBER] = graph_bytes(self.graph)
        arch = target_arch(self.manifest["target"]["dict"])
        launcher = build_launcher(arch) if arch != "cuda" else None
        if launcher is not None:
            members[LAUNCHER_MEMBER] = launcher  # runs the parallel loops where the artifact is loaded
        if self.device_source is not None:
            members[DEVICE_SOURCE] = self.device_source.encode()  # for inspection; the library has the binary
        return write_artifact(path, self.manifest, members)


DYNAMIC_BATCH_SIZES = (1, 8)  # the batch sizes dynamic_batch=True compiles


def _batch_sizes(dynamic_batch) -> tuple[int, ...] | None:
    """The batch sizes to compile for `dynamic_batch` (False/None: none, a static build; True:
    DYNAMIC_BATCH_SIZES; or an iterable of sizes, 1 added)."""
    if dynamic_batch is None or dynamic_batch is False:
        return None
    if dynamic_batch is True:
        return DYNAMIC_BATCH_SIZES
    try:
        sizes = list(dynamic_batch)
    except TypeError:
        sizes = None
    if not sizes or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes):
        raise CompileError(f"dynamic_batch must be True, False or batch sizes (positive ints), got {dynamic_batch!r}")
    return tuple(sorted(set(sizes) | {1}))


def check_sample_independent(graph: Graph, n: int, run, tolerance: float, seed: int = 0) -> float:
    """That `graph` at batch `n` computes each sample on its own: the outputs for a batch of `n`
    random samples match those for each sample alone at batch 1. `run(graph, inputs)` evaluates a
    graph (the reference interpreter). Returns the relative error; raises CompileError above
    `tolerance` (an op that mixes samples, e.g. a mean over the batch that keeps the shape)."""
    big, one = rebatch(graph, n), rebatch(graph, 1)
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(t.shape).astype(t.dtype) if np.dtype(t.dtype).kind == "f"
          else np.zeros(t.shape, t.dtype) for _, t in big.inputs]
    alone = [run(one, [x[i:i + 1] for x in xs]) for i in range(n)]
    err = relative_error(run(big, xs), [np.concatenate(ys) for ys in zip(*alone)])
    if not err <= tolerance:
        raise CompileError(f"dynamic batch: the graph mixes the samples of a batch (a batch of {n} differs from "
                           f"its samples run one by one by {err:.3g}, relative); compile it without dynamic_batch")
    return err


def compile(model, example_inputs=None, target="x86", passes=DEFAULT_PASSES, tune=None,
            dynamic_batch=False) -> CompiledModel:
    """Capture `model`, rewrite it with `passes` (names or Pass objects, each
    checked numerically), and build it for `target` (a name: 'x86', 'arm64', 'rpi4',
    'h100', 'sm_90', ...; or a TVM target dict). Code for another machine is built, not run.

    `tune`: None (default schedules), or a `shave.TuneOptions` to tune the conv
    kernels with MetaSchedule, keeping the results in its database directory
    (a later compile of the same kernels reuses them without tuning again).

    `dynamic_batch`: True builds one artifact that takes any batch size on axis 0 of the
    inputs: it holds the kernels for batches 1 and 8 (and the example inputs' batch), and a call
    runs a batch of n as chunks of those sizes, largest first (21 = 8 + 8 + 5 x 1), each at the
    speed of a static build of its size. A tuple of sizes (e.g. (1, 4, 32)) chooses them. The
    graph must compute each sample on its own (checked: the compile stops otherwise).

    `model` may also be an IR Graph (from shave.capture, perhaps already
    rewritten); then it is its own reference and example_inputs may be omitted."""
    spec = resolve_target(target)  # fail fast on a bad target or pass list, before any tracing
    sizes = _batch_sizes(dynamic_batch)
    passes = [get_pass(p) for p in pass_list(passes)]
    if tune is not None and not isinstance(tune, TuneOptions):
        raise CompileError(f"tune must be None or a shave.TuneOptions, got {type(tune).__name__}")

    t0 = time.perf_counter()
    if isinstance(model, Graph):
        graph = verify(model.copy())
        if example_inputs is None:
            example_inputs = tuple(torch.randn(t.shape).to(getattr(torch, t.dtype)) for _, t in graph.inputs)
        probes = _probes(_normalise_inputs(example_inputs))
        reference = run_probes(graph, probes)
    else:
        if example_inputs is None:
            raise CaptureError("shave.compile needs example_inputs to trace a torch model")
        model = eval_model(model)
        args = _normalise_inputs(example_inputs)
        graph = capture(model, args)
        probes = _probes(args)
        reference = _model_outputs(model, probes)
    report = Report()
    stats = graph.stats()
    captured = run_probes(graph, probes)
    report.add(stage="input graph" if isinstance(model, Graph) else "capture", contract="reference", flops=stats["flops"], params=stats["params"],
               bytes=stats["bytes"], nodes=stats["nodes"],
               error=relative_error(captured, reference), seconds=time.perf_counter() - t0)

    log.info("%s: %d nodes, %.1f MFLOPs, error %.3g vs the model, %.2f s", report.rows[0].stage, stats["nodes"],
             stats["flops"] / 1e6, report.rows[0].error, report.rows[0].seconds)
    with compiling_for(spec):  # passes given no target= plan for this one
        graph, report = run_passes(graph, passes, probes, reference, report, graph_outputs=captured)

    variants, batch_functions = {}, {}
    if sizes is not None:
        main_batch = batch_of(graph)
        check_sample_independent(graph, max(sizes), run_graph, build_tolerance(graph))
        batch_functions = {k: "main" if k == main_batch else f"main_b{k}" for k in sorted(set(sizes) | {main_batch})}
        variants = {f: rebatch(graph, k) for k, f in batch_functions.items() if f != "main"}
    library, seconds, tuned, calls = build(graph, spec, tune, variants)
    manifest = {
        "shave_version": __version__,
        "versions": _versions(),
        "target": {"name": target if isinstance(target, str) else "custom", "dict": spec,
                   "arch": target_arch(spec), "cpu_features": required_features(spec),
                   "fp32_flops_per_cycle": isa(spec).fp32_flops_per_cycle},
        "inputs": [{"name": n, "shape": list(t.shape), "dtype": t.dtype} for n, t in graph.inputs],
        "outputs": [{"name": v, "shape": list(graph.type_of(v).shape), "dtype": graph.type_of(v).dtype}
                    for v in graph.outputs],
    }
    if batch_functions:  # dynamic batch: the VM function for each compiled batch size (Runtime.run)
        manifest["batch_functions"] = {str(k): f for k, f in batch_functions.items()}
    manifest["kernels"] = calls  # which IR nodes each kernel call of shave's computes (Runtime.profile)
    if tuned is not None:
        manifest["tuning"] = {"summary": tuned.summary(), "kernels": tuned.kernels}
    cm = CompiledModel(graph, library, manifest, report)
    cm.tuning = tuned
    # code for another machine (aarch64, or a GPU this one lacks) is built but not run here
    compiled = [o for p in probes for o in cm._runtime.run(*p)] if cm.runs_here else None
    want = run_probes(graph, probes) if compiled is not None else None
    ir_err = relative_error(compiled, want) if compiled is not None else 0.0
    if cm.runs_here:  # each other batch size's function against the IR at that size
        for f, g in variants.items():
            rows = [np.concatenate([p[i] for p in probes]) for i in range(len(probes[0]))]  # the probes' samples,
            xs = _probes(tuple(torch.from_numpy(np.resize(r, t.shape)) for r, (_, t) in zip(rows, g.inputs)))
            got = [o for p in xs for o in cm._runtime.run(*p)]  # cycled, then random ones of their scale
            ir_err = max(ir_err, relative_error(got, run_probes(g, xs)))
    stats = graph.stats()
    row = report.add(stage=f"build ({spec.get('kind')} {spec.get('mcpu', spec.get('arch', ''))})".replace(" )", ")"),
               contract="exact", flops=stats["flops"], params=stats["params"], bytes=stats["bytes"],
               nodes=stats["nodes"], error=None if compiled is None else relative_error(compiled, reference),
               seconds=seconds,
               changes="" if tuned is None else f"tuned {tuned.tasks} conv kernels: "
                                                f"{tuned.default_ms:.2f} -> {tuned.tuned_ms:.2f} ms")
    if compiled is None:
        row.changes = "not run on this machine"
    if batch_functions:
        row.changes = "; ".join(filter(None, [row.changes, "dynamic batch: kernels for batch "
                                              + ", ".join(map(str, batch_functions))]))
    log.info("%s: %.2f s, %s", row.stage, seconds,
             row.changes or f"error {row.error:.3g} vs the model, {ir_err:.3g} vs the IR")
    # an int8 graph may be held to its own spread under last-digit changes (exact_check_tolerance)
    tolerance, spread = exact_check_tolerance(graph, probes, BUILD_TOLERANCE, ir_err, outputs=want)
    own = "" if spread is None else f"; the IR's own outputs move by {spread:.3g} under last-digit changes"
    if not ir_err <= tolerance:
        raise CompileError(f"compiled code disagrees with the IR it was built from by {ir_err:.3g} "
                           f"(relative; tolerance {tolerance:g}{own}): a backend bug")
    if spread is not None:  # within it: int8 codes on rounding boundaries, not a bug
        note = f"{ir_err:.3g} from the IR{own} (int8 codes on rounding boundaries)"
        row.changes = "; ".join(filter(None, [row.changes, note]))
        log.info("build: %s", note)
    manifest["report"] = report.to_dict()
    return cm


def _as_arrays(inputs) -> list:
    """Torch tensors as numpy arrays (other inputs as they are), for the runtime."""
    return [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in inputs]


def load_graph(path) -> Graph:
    """The IR graph from a file written by shave.save_graph, or from an artifact exported with
    cm.export(path, include_ir=True); `shave.compile(graph, target=...)` builds it again."""
    from .errors import IRError
    from .ir.serialize import graph_from_bytes, is_artifact, load_graph as load_ir_file
    from .runtime.artifact import read_artifact

    if not (Path(path).is_file() and is_artifact(path)):
        return load_ir_file(path)  # an IR file, or its errors (no such file, not readable)
    _, members = read_artifact(path)
    if IR_MEMBER not in members:
        raise IRError(f"{path}: the artifact holds no IR; export it with cm.export(path, include_ir=True)")
    return graph_from_bytes(members[IR_MEMBER], str(path))


def _versions() -> dict:
    import tvm

    return {"tvm": tvm.__version__, "torch": torch.__version__, "numpy": np.__version__}


def to_torch(graph: Graph, trainable: bool = True):
    """The graph as a torch module (eval mode) for evaluation or a training loop of your own
    (DDP, Lightning); `shave.from_torch(module, graph)` reads the trained weights back."""
    from .reference import to_torch as _to_torch

    return _to_torch(graph, trainable)


def from_torch(module, graph: Graph) -> Graph:
    """A copy of `graph` with the weights (and batch-norm statistics) of `module`, a module
    `shave.to_torch(graph)` made and you trained; DDP-wrapped modules are unwrapped."""
    from .reference import from_torch as _from_torch

    return _from_torch(module, graph)


