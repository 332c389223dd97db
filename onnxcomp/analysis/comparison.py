"""What ``onnxcomp compare`` measures (:mod:`onnxcomp.analysis.compare`), as data, JSON and a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcomp.analysis.inspect import human_bytes
from onnxcomp.errors import OnnxCompError

#: Rows of the per-node table in the text report (the JSON holds every node).
NODE_ROWS = 15


class ErrorStats:
    """Streaming sums for cosine, SQNR, max-abs error and top-1 agreement of one tensor."""

    def __init__(self) -> None:
        self.ref2 = self.test2 = self.dot = self.noise = self.max_abs = 0.0
        self.rows = self.agree = self.count = 0

    def add(self, ref: np.ndarray, test: np.ndarray, class_scores: bool = False) -> None:
        if ref.shape != test.shape:
            raise OnnxCompError(f"shapes differ: reference {ref.shape}, candidate {test.shape}")
        r, t = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
        diff = r - t
        self.count += 1
        self.ref2 += float(r @ r)
        self.test2 += float(t @ t)
        self.dot += float(r @ t)
        self.noise += float(diff @ diff)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
        if class_scores:
            self.rows += int(np.prod(ref.shape[:-1]))
            self.agree += int((ref.argmax(axis=-1) == test.argmax(axis=-1)).sum())

    def sqnr_db(self) -> float:
        if self.noise == 0:
            return float("inf")
        return float(10 * np.log10(self.ref2 / self.noise)) if self.ref2 else float("-inf")

    def cosine(self) -> float:
        denom = np.sqrt(self.ref2 * self.test2)
        return float(self.dot / denom) if denom else float(self.noise == 0)

    def top1(self) -> float | None:
        return self.agree / self.rows if self.rows else None


@dataclass
class OutputError:
    name: str
    cosine: float
    sqnr_db: float
    max_abs: float
    top1_agreement: float | None  # fraction of rows whose argmax agrees; None: not class scores


@dataclass
class NodeError:
    node: str
    op: str
    tensor: str
    local_sqnr_db: float
    local_cosine: float
    local_max_abs: float
    cumulative_sqnr_db: float


@dataclass
class Latency:
    reference_ms: float
    candidate_ms: float
    runs: int

    @property
    def ratio(self) -> float:
        return self.candidate_ms / self.reference_ms if self.reference_ms else float("inf")


@dataclass
class ComparisonReport:
    """What ``onnxcomp compare`` measured; ``to_json()`` for files, ``format()`` for people."""

    reference: str
    candidate: str
    data: str
    outputs: list[OutputError] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)  # {"reference": %, "candidate": %}
    nodes: list[NodeError] = field(default_factory=list)  # worst local SQNR first
    node_batches: int = 0
    latency: Latency | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # {"reference": bytes, "candidate": bytes}
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def clean(value: Any) -> Any:  # JSON has no infinities: "inf" / "-inf" strings (exact match)
            if isinstance(value, float) and not np.isfinite(value):
                return str(value)
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        out: dict[str, Any] = {
            "reference": self.reference,
            "candidate": self.candidate,
            "data": self.data,
            "outputs": [vars(o) for o in self.outputs],
            "accuracy": self.accuracy,
            "nodes": [vars(n) for n in self.nodes],
            "node_batches": self.node_batches,
            "sizes": self.sizes,
            "notes": self.notes,
        }
        if self.latency is not None:
            out["latency"] = {**vars(self.latency), "ratio": self.latency.ratio, "threads": 1, "level": "all"}
        return clean(out)


def _db(value: float) -> str:
    return "exact" if value == float("inf") else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]], indent: str = "", text_columns: int = 1) -> list[str]:
    """The first ``text_columns`` left-aligned, the numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header)] + [line(r) for r in rows]


def format_comparison(report: ComparisonReport) -> str:
    """The report as a readable table."""
    sizes = report.sizes
    ratio = f", {sizes['candidate'] / sizes['reference']:.2f}x" if sizes.get("reference") else ""
    lines = [
        f"reference  {report.reference} ({human_bytes(sizes.get('reference', 0))})",
        f"candidate  {report.candidate} ({human_bytes(sizes.get('candidate', 0))}{ratio})",
        f"data       {report.data}",
        "",
    ]
    rows = [
        [
            o.name,
            f"{o.cosine:.6f}",
            _db(o.sqnr_db),
            f"{o.max_abs:.4g}",
            "-" if o.top1_agreement is None else f"{o.top1_agreement * 100:.2f}%",
        ]
        for o in report.outputs
    ]
    lines += _table(["output", "cosine", "SQNR dB", "max abs", "top-1 agree"], rows)
    if report.accuracy:
        ref, cand = report.accuracy["reference"], report.accuracy["candidate"]
        lines.append(f"accuracy on the labels: reference {ref:.2f}%, candidate {cand:.2f}% ({cand - ref:+.2f} points)")
    if report.nodes:
        lines.append("")
        lines.append(
            f"per-node error over {report.node_batches} batch{'es' if report.node_batches != 1 else ''} "
            "(local: the node fed the reference's own inputs; cumulative: in a full run), worst local first:"
        )
        inexact = [n for n in report.nodes if n.local_sqnr_db != float("inf")]
        rows = [
            [n.node, n.op, _db(n.local_sqnr_db), _db(n.cumulative_sqnr_db), f"{n.local_max_abs:.4g}"]
            for n in inexact[:NODE_ROWS]
        ]
        if rows:
            lines += _table(["node", "op", "local SQNR dB", "cumulative SQNR dB", "local max abs"], rows, "  ", 2)
        more = len(inexact) - len(rows)
        exact = len(report.nodes) - len(inexact)
        tail = [f"{more} more (all in --json)"] if more > 0 else []
        tail += [f"{exact} node{'s' if exact != 1 else ''} exact (same values as the reference)"] if exact else []
        if tail:
            lines.append("  " + "; ".join(tail))
    if report.latency is not None:
        lat = report.latency
        lines.append("")
        lines.append(
            f"latency (onnxruntime CPU, ORT_ENABLE_ALL, 1 thread, median of {lat.runs} interleaved runs): "
            f"reference {lat.reference_ms:.3f} ms, candidate {lat.candidate_ms:.3f} ms, ratio {lat.ratio:.2f}x"
        )
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
