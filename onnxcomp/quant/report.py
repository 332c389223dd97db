"""Quantization report: per-node output SQNR against the float model, worst first.

Both models run on the same calibration batches with every compared tensor exposed as an extra
output; sums of signal and noise power are accumulated per tensor, so memory does not grow with
the number of batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from onnxcomp.runtime import ALL_CORES, ort_session, with_outputs


class _Acc:
    __slots__ = ("dot", "noise", "ref2", "test2")

    def __init__(self) -> None:
        self.ref2 = self.test2 = self.noise = self.dot = 0.0

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        r, t = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
        self.ref2 += float(r @ r)
        self.test2 += float(t @ t)
        self.dot += float(r @ t)
        d = r - t
        self.noise += float(d @ d)

    def sqnr(self) -> float:
        if self.noise == 0:
            return float("inf")
        return float(10 * np.log10(self.ref2 / self.noise)) if self.ref2 else float("-inf")

    def cosine(self) -> float:
        denom = np.sqrt(self.ref2 * self.test2)
        return float(self.dot / denom) if denom else 1.0


def quantization_report(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    node_outputs: Mapping[str, tuple[str, str]],
    batches: Iterable[Mapping[str, np.ndarray]],
    max_batches: int,
) -> dict[str, Any]:
    """``node_outputs``: tensor name -> (node name, op). Returns {"nodes": [...], "outputs": [...]}."""
    float_outs = {o.name for o in float_model.graph.output}
    quant_names = {v.name for v in quant_model.graph.value_info} | {o.name for o in quant_model.graph.output}
    quant_names |= {out for n in quant_model.graph.node for out in n.output}
    tensors = [t for t in node_outputs if t in quant_names]
    outputs = [o.name for o in float_model.graph.output if o.name in {q.name for q in quant_model.graph.output}]
    names = list(dict.fromkeys(tensors + outputs))
    ref_sess = ort_session(with_outputs(float_model, names), level="disable", threads=ALL_CORES)
    test_sess = ort_session(with_outputs(quant_model, names), level="disable", threads=ALL_CORES)
    accs = {n: _Acc() for n in names}
    seen = 0
    for batch in batches:
        if seen >= max_batches:
            break
        feeds = dict(batch)
        for name, ref, test in zip(names, ref_sess.run(names, feeds), test_sess.run(names, feeds), strict=True):
            if np.issubdtype(np.asarray(ref).dtype, np.floating):
                accs[name].add(np.asarray(ref), np.asarray(test))
        seen += 1
    nodes = [
        {
            "node": node_outputs[t][0],
            "op": node_outputs[t][1],
            "tensor": t,
            "sqnr_db": round(accs[t].sqnr(), 3),
            "cosine": round(accs[t].cosine(), 6),
        }
        for t in tensors
    ]
    nodes.sort(key=lambda r: (r["sqnr_db"], r["node"]))
    outs = [
        {"name": o, "sqnr_db": round(accs[o].sqnr(), 3), "cosine": round(accs[o].cosine(), 6)}
        for o in outputs
        if o in float_outs
    ]
    return {"batches": seen, "nodes": nodes, "outputs": outs}


def format_report(report: Mapping[str, Any], limit: int = 15) -> str:
    """The report as a text table (worst nodes first)."""
    lines = [f"per-node output SQNR vs float ({report['batches']} calibration batches), worst first:"]
    rows = report["nodes"][:limit]
    width = max([len(r["node"]) for r in rows] + [4])
    lines.append(f"  {'node':<{width}}  {'op':<13} {'SQNR dB':>8}  {'cosine':>8}")
    for r in rows:
        lines.append(f"  {r['node']:<{width}}  {r['op']:<13} {r['sqnr_db']:>8.2f}  {r['cosine']:>8.5f}")
    if len(report["nodes"]) > limit:
        lines.append(f"  ... {len(report['nodes']) - limit} more in the report JSON")
    for o in report["outputs"]:
        lines.append(f"model output {o['name']}: SQNR {o['sqnr_db']:.2f} dB, cosine {o['cosine']:.6f}")
    return "\n".join(lines)
