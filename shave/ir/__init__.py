"""The shave IR: typed graphs of registered ops with weights as values."""
from .graph import Graph, Node
from .ops import OpDef, get_op, register_op, registered_ops
from .serialize import load_graph, save_graph
from .types import TensorType
from .verify import infer_types, verify

__all__ = ["Graph", "Node", "TensorType", "OpDef", "get_op", "register_op", "registered_ops", "verify",
           "infer_types", "save_graph", "load_graph"]
