"""The op registry: everything about one IR op lives in one OpDef.

An OpDef holds the op's reference kernel (torch), its type inference, its
FLOP count, a check of its inputs and its *traits*: the facts passes and
backends ask instead of keeping their own lists of op names:

* ``role``: "layer" (has a weight), "norm", "activation" (unary, per
  element), "elementwise" (binary, broadcasting), "pool", "reduction",
  "movement" or "quant";
* ``weight`` / ``bias``: the input slots of a layer's weight and optional bias;
* ``out_axis``: the weight axis that indexes output channels (per group for
  a conv-transpose, whose weight is laid out in, out/groups, kh, kw);
* ``buffers``: input slots that hold statistics rather than trainable weights;
* ``epilogue``: ``attrs -> str`` naming the activation as a conv epilogue
  evaluates it ("relu", "clip:lo:hi", "sigmoid", "silu", "hardswish",
  "hardsigmoid"), None when the op cannot be fused after a layer;
* ``clip``: ``attrs -> (lo, hi)`` for activations that are a clamp (relu,
  relu6, clamp), the form an int8 requantisation applies for free;
* ``int8``: the integer op that computes a layer from uint8 activations and
  int8 weights ("qconv2d" for conv2d, "qlinear" for linear), None if none.

Backends keep their own lowering tables keyed by op name (see
backends/tvm/lowering.py).

Type inference runs the reference kernel on torch "meta" tensors (shapes
only, no data), so the kernel and the inferred type cannot disagree. Ops whose
inputs a pass commonly edits (conv2d, linear, batch_norm) also have an
explicit `check` that names the mismatch in IR terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import IRError
from .types import TensorType


ROLES = ("layer", "norm", "activation", "elementwise", "pool", "reduction", "movement", "quant", "other")


def _no_flops(in_types, out_type, attrs) -> int:
    return 0


def _no_check(in_types, attrs) -> None:
    return None


@dataclass(frozen=True)
class OpDef:
    name: str
    kernel: Callable[..., Any]  # torch reference: kernel(*tensors, **attrs) -> tensor
    flops: Callable[[list[TensorType], TensorType, dict], int] = _no_flops
    check: Callable[[list[TensorType], dict], None] = _no_check
    num_inputs: tuple[int, int] = (1, 1)  # (min, max); max -1 means any number
    attrs: tuple[str, ...] = ()  # attribute names the op requires
    channels: Callable | None = None  # (in_types, out_type, attrs) -> ChannelRule, see channels.py
    role: str = "other"
    weight: int | None = None
    bias: int | None = None
    out_axis: int | None = None
    buffers: tuple[int, ...] = ()
    epilogue: Callable[[dict], str] | None = None
    clip: Callable[[dict], tuple] | None = None
    int8: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"op {self.name!r}: role {self.role!r} is not one of {', '.join(ROLES)}")

    def infer(self, in_types: list[TensorType], attrs: dict) -> TensorType:
        import torch

        self.check(in_types, attrs)
        metas = [torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="meta") for t in in_types]
        out = self.kernel(*metas, **attrs)
        return TensorType(tuple(out.shape), str(out.dtype).replace("torch.", ""))


_REGISTRY: dict[str, OpDef] = {}


def register_op(name: str, kernel, **kw) -> OpDef:
    if name in _REGISTRY:
        raise ValueError(f"op {name!r} is already registered")
    op = OpDef(name, kernel, **kw)
    _REGISTRY[name] = op
    return op


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise IRError(f"unknown op {name!r}; registered ops: {', '.join(sorted(_REGISTRY))}") from None


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def ops_with(role: str) -> frozenset[str]:
    """Names of the registered ops with this role."""
    if role not in ROLES:
        raise ValueError(f"unknown op role {role!r}; roles: {', '.join(ROLES)}")
    return frozenset(n for n, op in _REGISTRY.items() if op.role == role)


def is_layer(node) -> bool:
    """A layer node: an op with a weight slot (conv2d, linear, conv_transpose2d, ...)."""
    return get_op(node.op).weight is not None


def weight_of(node) -> str:
    """The value name in a layer node's weight slot."""
    op = get_op(node.op)
    if op.weight is None:
        raise IRError(f"{node.name} ({node.op}) has no weight")
    return node.inputs[op.weight]


def bias_of(node) -> str | None:
    """The value name in a layer node's bias slot, None when it has no bias."""
    op = get_op(node.op)
    return node.inputs[op.bias] if op.bias is not None and op.bias < len(node.inputs) else None
