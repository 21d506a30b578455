"""The shave IR: typed graphs of registered ops with weights as values."""
from .graph import Graph, Node
from .ops import OpDef, bias_of, get_op, is_layer, ops_with, register_op, registered_ops, weight_of
from . import opset  # noqa: E402,F401  (registers the built-in ops)
from .serialize import load_graph, save_graph
from .types import TensorType
from .verify import infer_types, verify

__all__ = ["Graph", "Node", "TensorType", "OpDef", "get_op", "register_op", "registered_ops", "ops_with",
           "is_layer", "weight_of", "bias_of", "verify",
           "infer_types", "save_graph", "load_graph"]
