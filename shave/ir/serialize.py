"""Graph <-> JSON (structure) + npz (parameters)."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from ..errors import IRError
from .graph import Graph, Node
from .types import TensorType

FORMAT = "shave-ir/1"


def _jsonable(v):
    if isinstance(v, tuple):
        return {"tuple": [_jsonable(x) for x in v]}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _from_json(v):
    if isinstance(v, dict) and set(v) == {"tuple"}:
        return tuple(_from_json(x) for x in v["tuple"])
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def graph_to_json(graph: Graph) -> dict:
    return {
        "format": FORMAT,
        "inputs": [{"name": n, "shape": list(t.shape), "dtype": t.dtype} for n, t in graph.inputs],
        "outputs": list(graph.outputs),
        "nodes": [
            {
                "name": n.name, "op": n.op, "inputs": n.inputs,
                "attrs": {k: _jsonable(v) for k, v in n.attrs.items()},
                "type": None if n.type is None else {"shape": list(n.type.shape), "dtype": n.type.dtype},
                "source": n.source,
            }
            for n in graph.nodes
        ],
    }


def graph_from_json(doc: dict, params: dict[str, np.ndarray]) -> Graph:
    if doc.get("format") != FORMAT:
        raise IRError(f"not a shave IR document (format {doc.get('format')!r}, expected {FORMAT!r})")
    g = Graph(
        inputs=[(i["name"], TensorType(tuple(i["shape"]), i["dtype"])) for i in doc["inputs"]],
        outputs=list(doc["outputs"]),
    )
    for name, arr in params.items():
        g.set_param(name, arr)
    for d in doc["nodes"]:
        t = d["type"]
        g.nodes.append(Node(d["name"], d["op"], list(d["inputs"]), {k: _from_json(v) for k, v in d["attrs"].items()},
                            None if t is None else TensorType(tuple(t["shape"]), t["dtype"]), d.get("source", "")))
    return g


IR_MEMBER = "ir.zip"  # an artifact exported with include_ir=True holds the IR under this name


def graph_bytes(graph: Graph) -> bytes:
    """The graph as the bytes of an IR file: a zip holding graph.json and params.npz."""
    params, out = io.BytesIO(), io.BytesIO()
    np.savez(params, **graph.params)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("graph.json", json.dumps(graph_to_json(graph), indent=1))
        z.writestr("params.npz", params.getvalue())
    return out.getvalue()


def graph_from_bytes(data: bytes, where: str = "IR") -> Graph:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            doc = json.loads(z.read("graph.json"))
            with np.load(io.BytesIO(z.read("params.npz"))) as npz:
                params = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError, ValueError) as e:
        raise IRError(f"{where}: not a readable shave IR file ({e})") from None
    return graph_from_json(doc, params)


def save_graph(graph: Graph, path) -> Path:
    """Write `graph` to one file (a zip holding graph.json and params.npz); load_graph reads it."""
    path = Path(path)
    try:
        path.write_bytes(graph_bytes(graph))
    except OSError as e:
        raise IRError(f"cannot write IR file {path}: {e.strerror or e}") from None
    return path


def is_artifact(path) -> bool:
    """Whether `path` is a zip holding a manifest.json (a shave artifact, not an IR file)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return "manifest.json" in z.namelist()


def load_graph(path) -> Graph:
    """A graph from an IR file written by save_graph (shave.load_graph also reads artifacts)."""
    path = Path(path)
    if not path.is_file():
        raise IRError(f"{path}: no such file")
    if is_artifact(path):
        raise IRError(f"{path}: an artifact, not an IR file; shave.load_graph reads the IR an artifact holds")
    return graph_from_bytes(path.read_bytes(), str(path))
