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


def _kernels(cm, top: int = 12) -> list[tuple[str, str, float]]:
    """(IR nodes, shape, ms) of a compiled model's slowest kernel calls."""
    try:
        prof = cm.profile()
    except Exception:  # a profile is an extra: a runtime that cannot give one leaves it out
        return []
    calls = sorted(prof.calls, key=lambda c: -c.ms)[:top]
    return [(", ".join(c.nodes[:3]) + (" ..." if len(c.nodes) > 3 else "") or c.kernel, str(list(c.shape)), c.ms)
            for c in calls]


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
    for title, cm in (("original", result.baseline_compiled), ("chosen", result.compiled)):
        rows = _kernels(cm) if cm is not None else []
        if rows:
            lines += [f"## Slowest kernels, {title}", "", "| IR nodes | output | ms |", "|---|---|---:|"]
            lines += [f"| {n} | {s} | {ms:.3f} |" for n, s, ms in rows]
            lines.append("")
    path = directory / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
