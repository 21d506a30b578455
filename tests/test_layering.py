"""The package's layers (docs/architecture.md), checked on the source: every import, at module
level or inside a function, resolved to the module it names.

    errors <- runtime <- ir <- reference <- frontend, passes <- recovery, backends <- api
"""
import ast
import pathlib

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "shave"


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
    p = ROOT.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in ROOT.rglob("*.py"):
        mod = _module(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        g.add_node(mod)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                # `from pkg import name`: the submodule pkg.name when there is one
                targets = [f"{src}.{a.name}" if _exists(f"{src}.{a.name}") else src for a in node.names]
            for t in targets:
                if t.split(".")[0] == "shave" and t != mod:
                    g.add_edge(mod, t)
    return g


GRAPH = import_graph()


def _imports(prefix: str) -> dict[str, set[str]]:
    return {m: set(GRAPH.successors(m)) for m in GRAPH if m == prefix or m.startswith(prefix + ".")}


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(GRAPH) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def _inside(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("layer,allowed", [
    ("shave.errors", ()),
    ("shave.runtime", ("shave.runtime", "shave.errors")),
    ("shave.ir", ("shave.ir", "shave.errors")),
    ("shave.reference", ("shave.reference", "shave.ir", "shave.errors")),
    ("shave.frontend", ("shave.frontend", "shave.ir", "shave.errors")),
    ("shave.passes", ("shave.passes", "shave.ir", "shave.reference", "shave.errors", "shave.isa", "shave.target",
                      "shave.timing", "shave.runtime.report")),
    ("shave.recovery", ("shave.recovery", "shave.passes", "shave.ir", "shave.reference", "shave.errors")),
    ("shave.backends", ("shave.backends", "shave.ir", "shave.errors", "shave.isa", "shave.target", "shave.timing",
                        "shave.runtime")),
])
def test_layers_import_only_what_is_below_them(layer, allowed):
    bad = {m: sorted(t for t in ts if not _inside(t, allowed)) for m, ts in _imports(layer).items()}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"{layer} may import only {allowed}: {bad}"


def test_the_checker_sees_imports():
    """The graph is not vacuous: known edges, relative and inside functions, are found."""
    assert GRAPH.has_edge("shave.passes.fold_bn", "shave.ir")
    assert GRAPH.has_edge("shave.backends.tvm.lower", "shave.backends.tvm.lowering")
    assert GRAPH.has_edge("shave.isa", "shave.target")  # imported inside a function
