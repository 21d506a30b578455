"""The report of a shave.compress run: a markdown page and a Pareto plot (matplotlib)."""
from __future__ import annotations

from pathlib import Path


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (latency, score) points no other point beats on both (lower latency, higher score)."""
    out, best = [], float("-inf")
    for ms, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            out.append((ms, score))
            best = score
    return out


def plot(result, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tried = [c for c in result.pareto if not c.kept]
    kept = [c for c in result.pareto if c.kept]
    ax.scatter([c.latency_ms for c in tried], [c.score for c in tried], c="#bbbbbb", label="tried", zorder=2)
    ax.scatter([c.latency_ms for c in kept], [c.score for c in kept], c="#1f77b4", label="kept steps", zorder=3)
    front = _frontier([(c.latency_ms, c.score) for c in result.pareto])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", c="#1f77b4", alpha=0.5, label="frontier")
    ax.scatter([result.latency_ms], [result.score], marker="*", s=220, c="#d62728", label="chosen", zorder=4)
    ax.axhline(result.baseline_score, ls=":", c="#555555", label="original score")
    for name, ms in result.reference_ms.items():
        ax.axvline(ms, ls="--", c="#2ca02c", label=f"{name} (original model)")
    ax.set_xlabel("latency, ms (batch 1, measured)")
    ax.set_ylabel("score")
    ax.set_title("shave.compress: every candidate")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LAYER_OPS = ("conv2d", "linear", "qconv2d", "qlinear")


def _profile(cm):
    """cm's kernel profile on its example inputs (random, the shapes it was compiled for, as the
    search timed it), or None where it cannot run here: the report then leaves the times out."""
    if cm._runtime is None:
        return None
    try:
        return cm.profile(*cm._runtime.example_inputs())
    except NotImplementedError:  # a GPU model: the profile times CPU models only
        return None


def _kernels(prof, top: int = 12) -> list[tuple[str, str, float]]:
    """(IR nodes, shape, ms) of a profile's slowest kernel calls."""
    calls = sorted(prof.calls, key=lambda c: -c.ms)[:top]
    return [(", ".join(c.nodes[:3]) + (" ..." if len(c.nodes) > 3 else "") or c.kernel, str(list(c.shape)), c.ms)
            for c in calls]


def layer_origins(original, graph) -> dict[str, str]:
    """{layer node of `graph`: the layer of `original` it computes (part of)}. Passes keep a
    layer's name (pruning) or derive its parts' names from it: decomposed and rewritten layers'
    nodes and weights are named "<layer>.<part>", an int8 layer's weight "<layer>.weight.q"."""
    names = sorted((n.name for n in original.nodes if n.op in LAYER_OPS), key=len, reverse=True)
    known = set(names)
    out = {}
    for m in graph.nodes:
        if m.op not in LAYER_OPS:
            continue
        if m.name in known:
            out[m.name] = m.name
            continue
        for key in ([m.inputs[1]] if len(m.inputs) > 1 else []) + [m.name]:
            hit = next((n for n in names if key.startswith(n + ".")), None)
            if hit is not None:
                out[m.name] = hit
                break
    return out


def _channels(graph, n) -> tuple[int, int]:
    """(input, output) channels of a layer node."""
    axis = -1 if n.op in ("linear", "qlinear") else 1
    return graph.type_of(n.inputs[0]).shape[axis], n.type.shape[axis]


def _part(layer: str, m) -> str:
    """Which part of `layer` node m computes, from its name or its weight's ("<layer>.<part>...")."""
    for key in (m.name, m.inputs[1] if len(m.inputs) > 1 else ""):
        if key.startswith(layer + "."):
            part = key[len(layer) + 1:].split(".weight")[0]
            if part and not part.startswith("weight"):
                return part
    return m.op


def layer_rows(original, chosen, before, after) -> list[tuple[str, str, str, float | None, float | None]]:
    """(layer, original in -> out channels, what the chosen graph does with it, ms before, ms after)
    for every layer of `original` (slowest first), and a last row for the other kernels; times
    from the profiles `before` / `after` (of the compiled original and chosen models, or None)."""
    origin_before, origin_after = layer_origins(original, original), layer_origins(original, chosen)

    def per_layer(prof, origin):
        if prof is None:
            return {}, None
        times = {}
        for c in prof.calls:
            layer = next((origin[v] for v in c.nodes if v in origin), None)
            if layer is not None:
                times[layer] = times.get(layer, 0.0) + c.ms
        return times, prof.kernel_ms - sum(times.values())

    t_before, rest_before = per_layer(before, origin_before)
    t_after, rest_after = per_layer(after, origin_after)
    parts: dict[str, list] = {}
    for m in chosen.nodes:
        if m.name in origin_after:
            parts.setdefault(origin_after[m.name], []).append(m)
    rows = []
    for n in original.nodes:
        if n.op not in LAYER_OPS:
            continue
        cin, cout = _channels(original, n)
        got = parts.get(n.name, [])
        if not got:
            what = "removed"
        else:
            done = []
            new_in, new_out = _channels(chosen, got[0])[0], _channels(chosen, got[-1])[1]
            if (new_in, new_out) != (cin, cout):
                done.append(f"pruned to {new_in} -> {new_out}")
            if len(got) > 1:
                done.append(f"{len(got)} layers ({', '.join(_part(n.name, m) for m in got)})")
            if any(m.op.startswith("q") for m in got):
                done.append("int8")
            what = "; ".join(done) or "unchanged"
        rows.append((n.name, f"{cin} -> {cout}", what, t_before.get(n.name), t_after.get(n.name)))
    rows.sort(key=lambda r: -(r[3] or 0.0))
    rows.append(("other kernels (pools, concats, ...)", "", "", rest_before, rest_after))
    return rows


def write_report(result, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    plot(result, directory / "pareto.png")
    base_bytes = result.pareto[0].bytes if result.pareto else 0
    chosen_bytes = result.graph.stats()["bytes"]
    lines = ["# shave.compress report", "",
             "| model | score | latency ms | speed-up | weights MB |", "|---|---:|---:|---:|---:|",
             f"| original | {result.baseline_score:.4g} | {result.baseline_latency_ms:.3f} | 1.00x | {base_bytes / 1e6:.2f} |",
             f"| chosen | {result.score:.4g} | {result.latency_ms:.3f} | {result.speedup:.2f}x | {chosen_bytes / 1e6:.2f} |"]
    for name, ms in result.reference_ms.items():
        lines.append(f"| {name}, original model | - | {ms:.3f} | {result.baseline_latency_ms / ms:.2f}x | - |")
    lines += ["", f"Search: {len(result.pareto)} candidates in {result.seconds:.0f} s; {result.message}.", "",
              "## Steps kept", ""]
    lines += [f"{i}. {s}" for i, s in enumerate(result.steps, 1)] or ["none"]
    lines += ["", "## Every candidate", "", "| step | steps | score | latency ms | kept |", "|---:|---|---:|---:|---|"]
    for c in result.pareto:
        lines.append(f"| {c.step} | {' → '.join(c.steps) or 'original'} | {c.score:.4g} | {c.latency_ms:.3f} | "
                     f"{'yes' if c.kept else ''} |")
    lines += ["", "![score vs latency](pareto.png)", ""]
    if result.options:
        lines += ["## Per-layer options", "", "Every way to compress one layer or channel group alone that was "
                  "measured faster: the time its layers save compiled alone on the target, and the score lost "
                  "with it alone (no recovery); the search takes them by most time saved per point lost.", "",
                  "| option | technique | ms saved | score lost | step |", "|---|---|---:|---:|---:|"]
        lines += [f"| {o.label} | {o.technique} | {o.saving_ms:.4f} | {o.drop:.4g} | {o.step or ''} |"
                  for o in sorted(result.options, key=lambda o: (o.step is None, o.step or 0, -o.saving_ms))]
        lines.append("")
    profiles = {title: _profile(cm) if cm is not None else None
                for title, cm in (("original", result.baseline_compiled), ("chosen", result.compiled))}
    if result.baseline_compiled is not None and any(profiles.values()):
        fmt = lambda ms: "-" if ms is None else f"{ms:.3f}"  # noqa: E731
        lines += ["## Layers", "", "Each layer of the original model, what the chosen model does with it, and the "
                  "measured time of the kernels computing it (a kernel's time goes to the layer it computes, "
                  "with its fused epilogue).", "",
                  "| layer | channels in -> out | chosen model | ms before | ms after |", "|---|---|---|---:|---:|"]
        lines += [f"| {name} | {ch} | {what} | {fmt(b)} | {fmt(a)} |"
                  for name, ch, what, b, a in layer_rows(result.baseline_compiled.graph, result.compiled.graph,
                                                         profiles["original"], profiles["chosen"])]
        lines.append("")
    for title, prof in profiles.items():
        rows = _kernels(prof) if prof is not None else []
        if rows:
            lines += [f"## Slowest kernels, {title}", "", "| IR nodes | output | ms |", "|---|---|---:|"]
            lines += [f"| {n} | {s} | {ms:.3f} |" for n, s, ms in rows]
            lines.append("")
    path = directory / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
