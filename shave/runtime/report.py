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
