"""Shared pieces for the benchmarks: thread setup, timing, engines, models, machine facts, tables.

Every engine is built by a small factory that returns an `Engine`: a no-argument
`run()` doing one inference on a fixed input and returning the output as numpy,
plus the one-off setup time (export, compile). A new engine (torch.compile,
tuned shave, ...) is one more factory added to `ENGINES`; a new model is one
more entry in `MODELS`.

Import order matters for TVM: its thread pool reads TVM_NUM_THREADS once, when
first used, so call `set_thread_env(threads)` before anything imports tvm or
shave. This module imports neither at module level.
"""
from __future__ import annotations

import gc
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent

def ensure_shave_importable() -> None:
    """Let `python benchmarks/x.py` work from a checkout where shave is not pip-installed."""
    try:
        import importlib.util

        if importlib.util.find_spec("shave") is not None:
            return
    except (ImportError, ValueError):
        pass
    sys.path.insert(0, str(REPO_ROOT))


def set_thread_env(threads: int | None) -> None:
    """Pin TVM's worker count (None: shave's default, every CPU the process may use); must run
    before tvm is imported (it is read once)."""
    if threads is None:
        return
    os.environ["TVM_NUM_THREADS"] = str(threads)
    if "tvm" in sys.modules:
        warnings.warn("tvm was imported before set_thread_env(); TVM_NUM_THREADS may not take effect",
                      RuntimeWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Per-run wall times of one engine, in milliseconds."""

    samples_ms: list[float]
    warmup_runs: int

    def pct(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def runs(self) -> int:
        return len(self.samples_ms)

    @property
    def median(self) -> float:
        return self.pct(50)

    @property
    def p10(self) -> float:
        return self.pct(10)

    @property
    def p90(self) -> float:
        return self.pct(90)

    @property
    def iqr(self) -> float:
        return self.pct(75) - self.pct(25)

    def to_dict(self) -> dict:
        return {"median_ms": self.median, "p10_ms": self.p10, "p90_ms": self.p90, "p25_ms": self.pct(25),
                "p75_ms": self.pct(75), "min_ms": min(self.samples_ms), "runs": self.runs,
                "warmup_runs": self.warmup_runs, "samples_ms": self.samples_ms}


def measure(fn: Callable[[], object], *, warmup: int, repeats: int, budget_s: float,
            min_repeats: int = 3) -> tuple[Timing, object]:
    """Warm `fn` up, then time `repeats` single calls, each on its own.

    Slow engines get fewer timed runs: the count is cut so the timed part takes
    about `budget_s` (but never below `min_repeats`), and warm-up stops early
    once it has used a quarter of the budget (after at least one run). Returns
    the timing and the output of the last timed call, so the value checked for
    correctness is the one the timed code produced.
    """
    warm_times = []
    t_start = time.perf_counter()
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        warm_times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s / 4:
            break
    per_run = min(warm_times[-3:])  # the warmed-up estimate: ignore first-call costs
    n = int(max(min_repeats, min(repeats, budget_s // max(per_run, 1e-9))))

    samples, out = [], None
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one timed call would show up as noise
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            out = fn()
            samples.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(samples, len(warm_times)), out


# ---------------------------------------------------------------------------------------------
# engines


@dataclass
class Engine:
    name: str
    run: Callable[[], np.ndarray]  # one inference on the fixed input, output as numpy
    setup_s: float | None = None  # one-off cost before the first run (export, compile)
    info: dict = field(default_factory=dict)  # what was used, for the notes and the JSON
    call: Callable[[np.ndarray], np.ndarray] | None = None  # inference on any input (shave, ORT), numpy in/out


def eager_engine(model, x, threads: int) -> Engine:
    """PyTorch eager under inference_mode, on `threads` intra-op threads (None: torch's default)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    def run():
        with torch.inference_mode():
            return model(x).numpy()

    return Engine("pytorch eager", run, None, {"torch": torch.__version__, "threads": torch.get_num_threads()})


def torch_compile_engine(model, x, threads: int) -> Engine:
    """torch.compile (Inductor, default mode); the first call, which compiles, is the setup."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(x)
    setup = time.perf_counter() - t0

    def run():
        with torch.inference_mode():
            return compiled(x).numpy()

    return Engine("torch.compile", run, setup, {"torch": torch.__version__, "backend": "inductor",
                                                "threads": torch.get_num_threads()})


def export_onnx(model, x, path: Path, opset: int = 17, dynamic_batch: bool = False) -> str:
    """Write `model` as ONNX; returns which exporter was used.

    torch's torch.export-based exporter (dynamo=True, the default since 2.9)
    needs the `onnxscript` package; without it, the TorchScript exporter
    (dynamo=False, deprecated but present) is used. Both give a static-shape graph;
    `dynamic_batch` makes axis 0 of the input and output dynamic ("N", TorchScript exporter).
    """
    import importlib.util

    import torch

    kw = dict(input_names=["input"], output_names=["output"], opset_version=opset)
    if dynamic_batch:
        kw["dynamic_axes"] = {"input": {0: "N"}, "output": {0: "N"}}
    elif importlib.util.find_spec("onnxscript") is not None:
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=True, **kw)
            return f"torch.export-based (dynamo=True), opset {opset}"
        except Exception as e:  # fall through to the TorchScript exporter
            warnings.warn(f"dynamo ONNX export failed ({type(e).__name__}); using dynamo=False")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter" notice
        torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=True, **kw)
    return f"TorchScript-based (dynamo=False), opset {opset}"


def onnxruntime_engine(model, x, threads: int, workdir: Path | None = None) -> Engine:
    """ONNX Runtime, CPU execution provider, all graph optimisations, `threads` intra-op threads."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(dir=workdir) as d:
        path = Path(d) / "model.onnx"
        t0 = time.perf_counter()
        exporter = export_onnx(model, x, path)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        setup = time.perf_counter() - t0
    name = sess.get_inputs()[0].name
    feed = {name: x.numpy()}

    def run():
        return sess.run(None, feed)[0]

    return Engine("onnxruntime", run, setup, {"onnxruntime": ort.__version__, "exporter": exporter,
                                              "providers": sess.get_providers(), "intra_op_threads": threads},
                  call=lambda a: sess.run(None, {name: a})[0])


def shave_engine(model, x, threads: int, target: str = "x86", tune=None, name: str = "shave") -> Engine:
    """shave.compile (untuned, or tuned with `tune`, a shave.TuneOptions) and the
    compiled model's runtime, on numpy in / numpy out.

    The timed call includes what shave's runtime always does per call: copying
    the input into a TVM tensor and the output back into numpy.
    """
    import shave
    import tvm

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecation notices during capture
        cm = shave.compile(model, (x,), target=target, tune=tune)
    setup = time.perf_counter() - t0
    if threads:
        cm.threads = threads  # the runtime's thread count (TVM_NUM_THREADS, when set, caps it)
    xn = x.numpy()

    def run():
        return cm(xn)

    info = {"tvm": tvm.__version__, "target": target, "target_dict": cm.target,
            "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS"), "flops": cm.report.rows[-1].flops,
            "report": str(cm.report), "report_rows": cm.report.to_dict()["rows"]}
    if cm.tuning is not None:
        info.update(tuning=cm.tuning.summary(), tune_s=cm.tuning.seconds, tune_trials=cm.tuning.trials)
    return Engine(name, run, setup, info, call=cm)


def shave_tuned_engine(model, x, threads: int, target: str = "x86", trials: int = 200,
                       database: str = "out/tuning") -> Engine:
    """shave with MetaSchedule tuning (`trials` in all, database reused across runs)."""
    import shave

    return shave_engine(model, x, threads, target,
                        tune=shave.TuneOptions(trials=trials, database=database), name="shave tuned")


# name -> factory(model, x, threads) -> Engine; run in this order
ENGINES: dict[str, Callable[..., Engine]] = {
    "eager": eager_engine,
    "torch.compile": torch_compile_engine,
    "onnxruntime": onnxruntime_engine,
    "shave": shave_engine,
    "shave-tuned": shave_tuned_engine,
}
DEFAULT_ENGINES = ("eager", "torch.compile", "onnxruntime", "shave")  # shave-tuned: with --tune-trials


def model_flops(model, x) -> int:
    """FLOPs (multiply and add counted separately) from shave's IR, when no compile was run."""
    import shave

    return int(shave.capture(model, (x,)).stats()["flops"])


# ---------------------------------------------------------------------------------------------
# models


def _mobilenet_v2():
    from shave.zoo import pretrained_mobilenet_v2

    return pretrained_mobilenet_v2(), "MobileNetV2, ImageNet weights (torchvision IMAGENET1K_V1)"


def _torchvision(name: str, label: str, seed: int = 0, **kwargs):
    def make():
        import torch
        from shave.zoo import torchvision_models

        torch.manual_seed(seed)
        model = getattr(torchvision_models(), name)(weights=None, **kwargs).eval()
        return model, f"{label}, random init (torchvision, seed {seed})"
    return make


def _lenet5(seed: int = 0):
    import torch
    from shave.zoo import LeNet5

    torch.manual_seed(seed)
    return LeNet5().eval(), f"LeNet-5 (1x28x28, 0.85 MFLOP), random init (seed {seed})"


_NO_AUX = {"aux_logits": False, "init_weights": True}  # GoogLeNet, Inception-v3: no auxiliary heads

# name -> () -> (eval-mode model, description); input 3x224x224 unless INPUT_SHAPES says otherwise
MODELS: dict[str, Callable[[], tuple[object, str]]] = {
    "mobilenet_v2": _mobilenet_v2,
    "resnet18": _torchvision("resnet18", "ResNet-18"),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large", "MobileNetV3-Large"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small", "MobileNetV3-Small"),
    "efficientnet_b0": _torchvision("efficientnet_b0", "EfficientNet-B0"),
    "regnet_y_400mf": _torchvision("regnet_y_400mf", "RegNetY-400MF"),
    "shufflenet_v2": _torchvision("shufflenet_v2_x1_0", "ShuffleNetV2 x1.0"),
    "resnet50": _torchvision("resnet50", "ResNet-50"),
    "resnext50_32x4d": _torchvision("resnext50_32x4d", "ResNeXt-50 32x4d"),
    "wide_resnet50_2": _torchvision("wide_resnet50_2", "Wide ResNet-50-2"),
    "vgg11_bn": _torchvision("vgg11_bn", "VGG-11-BN"),
    "densenet121": _torchvision("densenet121", "DenseNet-121"),
    "googlenet": _torchvision("googlenet", "GoogLeNet", **_NO_AUX),
    "inception_v3": _torchvision("inception_v3", "Inception-v3", **_NO_AUX),
    "efficientnet_v2_s": _torchvision("efficientnet_v2_s", "EfficientNetV2-S"),
    "regnet_x_400mf": _torchvision("regnet_x_400mf", "RegNetX-400MF"),
    "squeezenet1_0": _torchvision("squeezenet1_0", "SqueezeNet 1.0"),
    "mnasnet1_0": _torchvision("mnasnet1_0", "MNASNet 1.0"),
    "convnext_tiny": _torchvision("convnext_tiny", "ConvNeXt-T"),
    "alexnet": _torchvision("alexnet", "AlexNet"),
    "lenet5": _lenet5,
}
DEFAULT_MODELS = ("mobilenet_v2", "resnet18")
INPUT_SHAPES = {"inception_v3": (3, 299, 299), "lenet5": (1, 28, 28)}  # (C, H, W); others 3x224x224


def make_input(batch: int, size: int = 224, seed: int = 0, channels: int = 3):
    """A fixed N(0, 1) image batch: roughly the range of ImageNet-normalised pixels."""
    import torch

    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def model_input(name: str, batch: int, seed: int = 0):
    """make_input at the shape model `name` takes."""
    c, h, w = INPUT_SHAPES.get(name, (3, 224, 224))
    assert h == w
    return make_input(batch, h, seed, channels=c)


def output_diff(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |out - ref|, that divided by max |ref|); inf when the shapes differ."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        return float("inf"), float("inf")
    d = float(np.abs(out - ref).max(initial=0.0))
    return d, d / max(float(np.abs(ref).max(initial=0.0)), 1e-12)


# ---------------------------------------------------------------------------------------------
# machine facts


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(threads: int) -> dict:
    """CPU model, its ISA as shave targets it (LLVM CPU name, vector width, int8 dot product),
    clock, and the fp32 peak for the cores `threads` can use: fp32 FLOPs one core retires per
    cycle from shave.isa (lanes x 2 x FMA pipes: 32 on AVX2, 64 on AVX-512 with two FMA pipes),
    a ceiling, not a target."""
    from shave.isa import isa

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    mhz = _cpuinfo_field("cpu MHz")
    mhz = float(mhz) if mhz else None
    used = min(threads or cores, cores)
    host = isa(platform.machine() == "aarch64" and "arm64" or "x86")
    flop = host.fp32_flops_per_cycle
    peak = used * flop * mhz / 1e3 if mhz else None
    return {"cpu": _cpuinfo_field("model name") or platform.processor() or platform.machine(),
            "isa": host.describe(), "cores": cores, "cpu_mhz": mhz, "cores_used": used, "flop_per_cycle": flop,
            "peak_gflops": peak, "python": platform.python_version(),
            "cpuid_mask": os.environ.get("SHAVE_BENCH_CPUID_MASK")}  # set by avx2_host.py


def host_line(threads: int = 2) -> str:
    """One line naming the host a benchmark ran on: CPU model, cores, ISA as shave targets it."""
    info = machine_info(threads)
    masked = (f"; CPUID masked to {info['cpuid_mask']} for every engine (benchmarks/avx2_host.py)"
              if info["cpuid_mask"] else "")
    return f"host: {info['cpu']}, {info['cores']} cores; {info['isa']}{masked}"


def loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


class CpuWatch:
    """How much CPU other processes took while a block ran (Linux /proc/stat).

    A benchmark on a shared machine is only as good as its quiet: this turns
    "was anything else running?" into a number. `others_pct` is the busy time
    of all CPUs, minus this process's own CPU time, plus time stolen by the
    hypervisor, as a percentage of (wall time x cores); 0 means nothing else ran.
    `self_cores` is this process's CPU time over wall time: about how many
    cores the timed engine kept busy (a check that its thread setting took).
    """

    def __enter__(self):
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        self.others_pct = self.self_cores = None
        if self._start is not None and end is not None:
            (w0, b0, s0, o0), (w1, b1, s1, o1) = self._start, end
            cores = os.cpu_count() or 1
            wall = max(w1 - w0, 1e-9)
            others = max(0.0, (b1 - b0) - (o1 - o0)) + (s1 - s0)
            self.others_pct = min(100.0, 100.0 * others / (wall * cores))
            self.self_cores = (o1 - o0) / wall
        return False

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
        steal = (v[7] if len(v) > 7 else 0) / hz
        t = os.times()
        return time.perf_counter(), busy, steal, t.user + t.system


def wait_for_quiet(max_wait_s: float, threshold_pct: float = 5.0, window_s: float = 2.0) -> float | None:
    """Wait (up to `max_wait_s`) until other processes use under `threshold_pct` of the CPUs
    over a `window_s` window. Returns their share in the last window (None without /proc/stat)."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        with CpuWatch() as w:
            time.sleep(window_s)
        if w.others_pct is None or w.others_pct < threshold_pct or time.perf_counter() >= deadline:
            return w.others_pct


# ---------------------------------------------------------------------------------------------
# output


def markdown_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A padded markdown table; columns whose index is in `right` are right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def fmt_ratio(r: float) -> str:
    """A time ratio with about three significant digits: 0.0123x, 0.72x, 12.3x."""
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x" if r >= 0.1 else f"{r:.3g}x"


def fmt_ms(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"
