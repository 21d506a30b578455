"""The IR run as PyTorch: the reference for verification and the module for fine-tuning."""
from .module import run_graph, to_torch

__all__ = ["to_torch", "run_graph"]
