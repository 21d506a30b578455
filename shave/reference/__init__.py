"""The reference interpreter: the IR run as PyTorch, op by op with each op's registered kernel.
It is what every pass is checked against, and the module fine-tuning trains."""
from .interpreter import IRBatchNorm, forward_with_values, from_torch, run_graph, to_torch

__all__ = ["to_torch", "from_torch", "IRBatchNorm", "run_graph", "forward_with_values"]
