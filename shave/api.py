"""shave.compile(): capture -> passes -> lower -> CompiledModel."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .backends.tvm.build import build
from .backends.tvm.quiet import quiet_tvm
from .backends.tvm.target import required_features, resolve_target, target_arch
from .errors import CompileError
from .frontend.capture import _normalise_inputs, capture, eval_model
from .ir import Graph
from .passes import DEFAULT_PASSES, run_passes, run_probes
from .report import Report, relative_error
from .runtime.artifact import LIB, write_artifact
from .runtime.module import Runtime

BUILD_TOLERANCE = 1e-4  # compiled code vs the IR it was built from, relative to output scale


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

    def __init__(self, graph: Graph, executable, manifest: dict, report: Report):
        self.graph = graph
        self.report = report
        self.manifest = manifest
        self._executable = executable
        self._runtime = Runtime(executable, manifest)

    @property
    def target(self) -> dict:
        return self.manifest["target"]["dict"]

    def __call__(self, *inputs):
        as_torch = any(isinstance(x, torch.Tensor) for x in inputs)
        arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in inputs]
        outs = self._runtime.run(*arrays)
        if as_torch:
            outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def export(self, path) -> Path:
        """Write the artifact (one file) that shave.load() runs without torch."""
        with tempfile.TemporaryDirectory() as d:
            lib = Path(d) / LIB
            with quiet_tvm():
                self._executable.export_library(str(lib))
            return write_artifact(path, self.manifest, {LIB: lib.read_bytes()})


def compile(model: torch.nn.Module, example_inputs, target="x86", passes=DEFAULT_PASSES, tune=None) -> CompiledModel:
    """Capture `model`, rewrite it with `passes` (names or Pass objects, each
    checked numerically), and build it for `target` ('x86' or a TVM target dict)."""
    if tune is not None:
        raise NotImplementedError("tuning is not available yet; pass tune=None")
    spec = resolve_target(target)  # fail fast on a bad target, before any tracing
    model = eval_model(model)
    args = _normalise_inputs(example_inputs)

    t0 = time.perf_counter()
    graph = capture(model, args)
    probes = _probes(args)
    reference = _model_outputs(model, probes)
    report = Report()
    stats = graph.stats()
    report.add(stage="capture", contract="reference", flops=stats["flops"], params=stats["params"],
               bytes=stats["bytes"], nodes=stats["nodes"],
               error=relative_error(run_probes(graph, probes), reference), seconds=time.perf_counter() - t0)

    graph, report = run_passes(graph, list(passes), probes, reference, report)

    executable, seconds = build(graph, spec)
    manifest = {
        "shave_version": __version__,
        "versions": _versions(),
        "target": {"name": target if isinstance(target, str) else "custom", "dict": spec,
                   "arch": target_arch(spec), "cpu_features": required_features(spec)},
        "inputs": [{"name": n, "shape": list(t.shape), "dtype": t.dtype} for n, t in graph.inputs],
        "outputs": [{"name": v, "shape": list(graph.type_of(v).shape), "dtype": graph.type_of(v).dtype}
                    for v in graph.outputs],
    }
    cm = CompiledModel(graph, executable, manifest, report)
    compiled = [o for p in probes for o in cm._runtime.run(*p)]
    ir_err = relative_error(compiled, run_probes(graph, probes))
    stats = graph.stats()
    report.add(stage=f"build ({spec.get('kind')} {spec.get('mcpu', spec.get('arch', ''))})".replace(" )", ")"),
               contract="exact", flops=stats["flops"], params=stats["params"], bytes=stats["bytes"],
               nodes=stats["nodes"], error=relative_error(compiled, reference), seconds=seconds)
    if not ir_err <= BUILD_TOLERANCE:
        raise CompileError(f"compiled code disagrees with the IR it was built from by {ir_err:.3g} "
                           f"(relative; tolerance {BUILD_TOLERANCE:g}): a backend bug")
    manifest["report"] = report.to_dict()
    return cm


def _versions() -> dict:
    import tvm

    return {"tvm": tvm.__version__, "torch": torch.__version__, "numpy": np.__version__}


def to_torch(graph: Graph, trainable: bool = True):
    from .backends.torch import to_torch as _to_torch

    return _to_torch(graph, trainable)


