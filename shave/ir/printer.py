"""Readable text form of a Graph."""
from __future__ import annotations

from .types import TensorType


def _fmt_attr(v) -> str:
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(_fmt_attr(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def format_graph(graph) -> str:
    lines = []
    ins = ", ".join(f"%{n}: {t}" for n, t in graph.inputs)
    lines.append(f"graph({ins}) {{")
    used = {v for n in graph.nodes for v in n.inputs}
    for name, arr in graph.params.items():
        if name in used:
            lines.append(f"  param %{name}: {TensorType.of(arr)}")
    for n in graph.nodes:
        args = ", ".join(f"%{v}" for v in n.inputs)
        attrs = ", ".join(f"{k}={_fmt_attr(v)}" for k, v in n.attrs.items())
        sep = ", " if args and attrs else ""
        src = f"    # {n.source}" if n.source else ""
        lines.append(f"  %{n.name}: {n.type} = {n.op}({args}{sep}{attrs}){src}")
    lines.append("  return " + ", ".join(f"%{v}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
