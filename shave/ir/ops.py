"""The op registry: everything about one IR op lives in one OpDef.

An OpDef holds the op's reference kernel (torch), its type inference, its
FLOP count and a check of its inputs. Backends keep their own lowering tables
keyed by op name (see backends/tvm/lower.py).

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
    from . import opset  # noqa: F401  (registers the built-in ops)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise IRError(f"unknown op {name!r}; registered ops: {', '.join(sorted(_REGISTRY))}") from None


def registered_ops() -> list[str]:
    from . import opset  # noqa: F401

    return sorted(_REGISTRY)
