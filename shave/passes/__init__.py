"""Graph -> Graph rewrites. Every pass here is also registered by name."""
from .base import FunctionPass, Pass, PassResult, get_pass, pass_list, register_pass, registered_passes
from .instruments import IRDump, NumericCheck, PassInstrument, instrumented
from .decompose import Decompose
from .fold_bn import FoldBN
from .manager import run_passes, run_probes
from .prune import Prune
from .rewrites import DepthwiseSeparable, GroupRewrite, ShiftRewrite
from .quantize import Quantize
from .share import ShareWeights

DEFAULT_PASSES = ("fold_bn",)

__all__ = ["Pass", "PassResult", "PassInstrument", "NumericCheck", "IRDump", "instrumented", "FunctionPass", "register_pass", "get_pass", "registered_passes", "run_passes", "run_probes", "FoldBN", "Prune", "Decompose",
           "Quantize", "ShareWeights",
           "ShiftRewrite", "GroupRewrite", "DepthwiseSeparable",
           "DEFAULT_PASSES"]
