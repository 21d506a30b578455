"""The compile report: one row per stage (capture, each pass, the build)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


def relative_error(outputs, reference) -> float:
    """max |out - ref| / max |ref| over all outputs (0 when identical)."""
    worst = 0.0
    for o, r in zip(outputs, reference):
        o, r = np.asarray(o, np.float64), np.asarray(r, np.float64)
        if o.shape != r.shape:
            return float("inf")
        scale = max(float(np.abs(r).max(initial=0.0)), 1e-12)
        worst = max(worst, float(np.abs(o - r).max(initial=0.0)) / scale)
    return worst


# A graph that rounds float results to int8 codes (a quantize op, or an int8 layer with a sigmoid or SiLU
# computed in float) can land one code away wherever two computations of the same float value differ
# in the last bit: the backend's exp or summation order against PyTorch's, or a batch norm folded into
# the conv before it. One code in an early layer moves the outputs by ~1e-3..1e-2, so "exact" for such
# graphs means within this bound (a real bug is off by far more); the report shows the error.
INT8_BOUNDARY_TOLERANCE = 5e-2


def rounds_floats_to_int8(graph) -> bool:
    """Whether `graph` rounds float values to int8 codes (see INT8_BOUNDARY_TOLERANCE)."""
    return any(n.op == "quantize" or (n.op in ("qconv2d", "qlinear") and n.attrs.get("act") in ("sigmoid", "silu"))
               for n in graph.nodes)


def exact_tolerance(graph, tolerance: float) -> float:
    """The tolerance an exact step (a pass, the build) gets on `graph`: its own, widened to
    INT8_BOUNDARY_TOLERANCE where the graph rounds floats to int8."""
    return max(tolerance, INT8_BOUNDARY_TOLERANCE) if rounds_floats_to_int8(graph) else tolerance


@dataclass
class Row:
    stage: str
    contract: str  # "reference", "exact", "lossy", "build"
    flops: int
    params: int
    bytes: int
    nodes: int
    error: float | None  # relative to the reference outputs
    seconds: float
    changes: str = ""  # op counts that changed, e.g. "-52 batch_norm"
    plan: list = field(default_factory=list)  # what the pass did to each layer (PassResult.records)
    summary: str = ""  # the plan as the pass renders it (PassResult.summary())


def op_changes(before: dict[str, int], after: dict[str, int]) -> str:
    parts = []
    for op in sorted(set(before) | set(after)):
        d = after.get(op, 0) - before.get(op, 0)
        if d:
            parts.append(f"{d:+d} {op}")
    return ", ".join(parts)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, **kw) -> Row:
        row = Row(**kw)
        self.rows.append(row)
        return row

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        return cls([Row(**r) for r in d.get("rows", [])])

    def plans(self) -> str:
        """Every pass's per-layer plan, one block per pass that has one."""
        blocks = []
        for r in self.rows:
            if r.summary:
                blocks.append(f"{r.stage}:\n" + "\n".join("  " + line for line in r.summary.splitlines()))
            elif r.plan:
                keys = list(dict.fromkeys(k for rec in r.plan for k in rec))
                lines = ["  " + "  ".join(f"{k}={rec.get(k)!s}" for k in keys if rec.get(k) not in (None, "", []))
                         for rec in r.plan]
                blocks.append(f"{r.stage}:\n" + "\n".join(lines))
        return "\n".join(blocks)

    def __getitem__(self, stage: str) -> Row:
        for r in self.rows:
            if r.stage == stage:
                return r
        raise KeyError(stage)

    def __str__(self) -> str:
        head = ("stage", "contract", "MFLOPs", "params", "MB", "nodes", "max rel err", "time s", "changes")
        lines = []
        for r in self.rows:
            err = "-" if r.error is None else f"{r.error:.2e}"
            lines.append((r.stage, r.contract, f"{r.flops / 1e6:.1f}", f"{r.params:,}", f"{r.bytes / 2**20:.2f}",
                          str(r.nodes), err, f"{r.seconds:.2f}", r.changes))
        widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
        fmt = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])

    __repr__ = __str__

    def save(self, directory, profile=None) -> list:
        """Write the report to `directory` (made if missing): report.md (the stage table and every
        pass's plan), stages.png (MFLOPs and parameters per stage, and each stage's error against
        the model), plan-<stage>.png for plans with before/after figures per layer (Prune's
        channels, Decompose's and the rewrites' MACs) and, given a Profile (cm.profile(x)),
        kernels.png with the slowest kernel calls. Returns the paths written. Needs matplotlib."""
        from pathlib import Path

        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            from ..errors import ShaveError

            raise ShaveError("Report.save needs matplotlib (pip install matplotlib)") from None
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        md = ["# shave compile report", "", "```", str(self), "```", ""]
        if self.plans():
            md += ["## Per-layer plans", "", "```", self.plans(), "```", ""]
        if profile is not None:
            md += ["## Kernel profile", "", "```", str(profile), "```", ""]
        (out / "report.md").write_text("\n".join(md))
        written.append(out / "report.md")

        stages = [r.stage for r in self.rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
        a1.bar(range(len(stages)), [r.flops / 1e6 for r in self.rows], color="tab:blue", label="MFLOPs")
        a1b = a1.twinx()
        a1b.plot(range(len(stages)), [r.params / 1e3 for r in self.rows], "o-", color="tab:orange",
                 label="parameters (thousands)")
        a1.set_ylabel("MFLOPs")
        a1b.set_ylabel("parameters (thousands)")
        errs = [(i, r.error) for i, r in enumerate(self.rows) if r.error is not None and r.error > 0]
        if errs:
            a2.semilogy([i for i, _ in errs], [e for _, e in errs], "s-", color="tab:red")
        a2.set_ylabel("max relative error vs the model")
        for ax in (a1, a2):
            ax.set_xticks(range(len(stages)))
            ax.set_xticklabels(stages, rotation=30, ha="right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "stages.png", dpi=110)
        plt.close(fig)
        written.append(out / "stages.png")

        pairs = (("channels", "kept"), ("macs_before", "macs_after"))
        for r in self.rows:
            pair = next((p for p in pairs if r.plan and all(k in r.plan[0] for k in p)), None)
            if pair is None:
                continue
            names = [str(rec.get("group", rec.get("name", i))) for i, rec in enumerate(r.plan)]
            fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 3.8))
            xs = range(len(names))
            ax.bar(xs, [rec[pair[0]] for rec in r.plan], color="lightgray", label=pair[0])
            ax.bar(xs, [rec[pair[1]] for rec in r.plan], color="tab:green", width=0.5, label=pair[1])
            ax.set_xticks(list(xs))
            ax.set_xticklabels(names, rotation=90, fontsize=6)
            ax.set_title(f"{r.stage}: per layer")
            ax.legend()
            fig.tight_layout()
            path = out / f"plan-{''.join(c if c.isalnum() else '_' for c in r.stage)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

        if profile is not None:
            top = sorted(profile.calls, key=lambda c: -c.ms)[:25]
            fig, ax = plt.subplots(figsize=(9, 0.3 * len(top) + 1.2))
            from .profile import BUILTIN

            labels = [(c.nodes[0] if c.nodes and c.kernel != BUILTIN else c.kernel)[:40] for c in top]
            ax.barh(range(len(top)), [c.ms for c in top], color="tab:purple")
            ax.set_yticks(range(len(top)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(f"ms per kernel call, instrumented ({profile.threads} threads; "
                          f"a whole call uninstrumented: {profile.call_ms:.2f} ms)")
            fig.tight_layout()
            fig.savefig(out / "kernels.png", dpi=110)
            plt.close(fig)
            written.append(out / "kernels.png")
        return written
