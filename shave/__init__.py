"""shave: a graph-level compiler that makes trained PyTorch CNNs small and fast.

    cm = shave.compile(model, (x,), target="x86")   # capture -> passes -> TVM
    cm.export("model.shave"); rt = shave.load("model.shave")

`shave.load` and the runtime need only TVM's runtime and numpy; everything
else (which needs torch) is imported on first use.
"""
__version__ = "0.1.0"

from .errors import (ArtifactError, CaptureError, CompileError, CompressError, ExportError, InputError, IRError,  # noqa: E402
                     PassError, ShaveError, TargetError, UnsupportedOpError)
from .runtime import Runtime, load  # noqa: E402

_LAZY = {
    "compile": ("api", "compile"),
    "CompiledModel": ("api", "CompiledModel"),
    "to_torch": ("api", "to_torch"),
    "from_torch": ("api", "from_torch"),
    "capture": ("frontend", "capture"),
    "compress": ("compression", "compress"),
    "export_onnx": ("onnx_export", "export_onnx"),
    "finetune": ("recovery", "finetune"),
    "augment": ("recovery", "augment"),
    "register_pass": ("passes", "register_pass"),
    "Pass": ("passes", "Pass"),
    "Graph": ("ir", "Graph"),
    "save_graph": ("ir", "save_graph"),
    "load_graph": ("api", "load_graph"),
    "Report": ("runtime.report", "Report"),
    "layer_timer": ("timing", "layer_timer"),
    "LayerTimer": ("timing", "LayerTimer"),
    "TuneOptions": ("backends.tvm.tune", "TuneOptions"),
}


_SUBMODULES = ("passes", "ir", "zoo", "frontend", "backends", "api", "reference", "target", "isa", "timing")


def __getattr__(name):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'shave' has no attribute {name!r}")


def __dir__():
    """The lazy attributes too, so tab completion and dir() show shave.compile, capture, ..."""
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["compile", "compress", "export_onnx", "load", "capture", "to_torch", "from_torch", "finetune", "augment", "passes", "register_pass", "Pass", "CompiledModel", "Runtime", "TuneOptions",
           "layer_timer", "LayerTimer",
           "Graph", "Report", "ShaveError", "CaptureError", "UnsupportedOpError", "IRError", "PassError",
           "TargetError", "CompileError", "CompressError", "ArtifactError", "InputError", "ExportError"]
