"""Quantization report: per-node output SQNR against the float model, worst first.

Both models run on the same calibration batches with every compared tensor exposed as an extra
output, one model after the other (the float tensors of the few report batches are kept between
them); sums of signal and noise power are accumulated per tensor.

Two figures per node: the *cumulative* SQNR (the node's output in the quantized model, carrying
every upstream error) and the *local* SQNR (the quantized node fed the float model's input, so
it isolates the node: the one to look at when choosing what to ``--skip``). The local figures
come from one extra session over the local model of :mod:`onnxcomp.analysis.local_error` (the
same as ``onnxcomp compare``'s).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from onnxcomp.analysis.local_error import plan_local_error
from onnxcomp.ir.mapped import is_large
from onnxcomp.runtime import ALL_CORES, ort_session


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
    plan = plan_local_error(float_model, quant_model)  # each node fed the float model's own tensors
    # A model with 1 GiB of mapped weights or more gets no local figures: every layer's float inputs
    # would be kept for every report batch beside the outputs, for a third session (docs/scale.md).
    big = is_large(float_model)
    local_of = {} if big else {t.local_name: t.tensor for t in plan.targets if t.tensor in set(tensors)}
    fed = {i.name for i in float_model.graph.input}  # graph inputs come from the batch itself
    local_inputs = plan.feeds if local_of else []
    exposed = list(dict.fromkeys(names + [n for n in local_inputs if n not in fed]))
    # One session at a time (float, quantized, local), each over the same batches in order: a
    # model's weights are in memory once at a time, whatever its size (docs/scale.md); the float
    # tensors of the few report batches are kept in between.
    ref_sess = ort_session(float_model, level="disable", threads=ALL_CORES, expose=exposed)
    feeds_and_refs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for batch in batches:
        if len(feeds_and_refs) >= max_batches:
            break
        feeds = dict(batch)
        refs = dict(zip(exposed, ref_sess.run(exposed, feeds), strict=True))
        refs.update({n: feeds[n] for n in local_inputs if n in fed})
        feeds_and_refs.append((feeds, refs))
    del ref_sess
    accs = {n: _Acc() for n in names}
    test_sess = ort_session(quant_model, level="disable", threads=ALL_CORES, expose=names)
    for feeds, refs in feeds_and_refs:
        for name, test in zip(names, test_sess.run(names, feeds), strict=True):
            if np.issubdtype(np.asarray(refs[name]).dtype, np.floating):
                accs[name].add(np.asarray(refs[name]), np.asarray(test))
    del test_sess
    local_accs = {n: _Acc() for n in local_of.values()}
    local_sess: Any = None
    if local_of and feeds_and_refs:
        try:  # built once the feeds' dtypes are known; no local figures rather than no report
            refs = feeds_and_refs[0][1]
            model = plan.local_model(quant_model, {n: np.asarray(refs[n]).dtype for n in local_inputs})
            local_sess = ort_session(model, level="disable", threads=ALL_CORES)
        except Exception:  # noqa: BLE001 - onnxruntime raises several unrelated types
            local_of, local_accs = {}, {}
    if local_of:
        wanted = list(local_of)
        for _, refs in feeds_and_refs:
            outs = local_sess.run(wanted, {n: refs[n] for n in local_inputs})
            for name, test in zip(wanted, outs, strict=True):
                local_accs[local_of[name]].add(np.asarray(refs[local_of[name]]), np.asarray(test))
    seen = len(feeds_and_refs)
    nodes = [
        {
            "node": node_outputs[t][0],
            "op": node_outputs[t][1],
            "tensor": t,
            "sqnr_db": round(accs[t].sqnr(), 3),
            "cosine": round(accs[t].cosine(), 6),
            **({"local_sqnr_db": round(local_accs[t].sqnr(), 3)} if t in local_accs else {}),
        }
        for t in tensors
    ]
    nodes.sort(key=lambda r: (r.get("local_sqnr_db", r["sqnr_db"]), r["sqnr_db"], r["node"]))
    outs = [
        {"name": o, "sqnr_db": round(accs[o].sqnr(), 3), "cosine": round(accs[o].cosine(), 6)}
        for o in outputs
        if o in float_outs
    ]
    skipped = {"local_sqnr": "not computed: the model has 1 GiB of weights or more (docs/scale.md)"} if big else {}
    return {"batches": seen, "nodes": nodes, "outputs": outs, **skipped}


#: A node whose local SQNR is this far below the median is suggested for ``--skip``.
SKIP_MARGIN_DB = 10.0


def skip_suggestions(report: Mapping[str, Any], limit: int = 3) -> list[str]:
    """Nodes whose own (local) error stands out: local SQNR >= SKIP_MARGIN_DB below the median."""
    local = [r for r in report["nodes"] if "local_sqnr_db" in r]
    if len(local) < 2:
        return []
    median = float(np.median([r["local_sqnr_db"] for r in local]))
    worst = sorted(local, key=lambda r: r["local_sqnr_db"])
    return [r["node"] for r in worst if r["local_sqnr_db"] <= median - SKIP_MARGIN_DB][:limit]


def format_report(report: Mapping[str, Any], limit: int = 15) -> str:
    """The report as a text table (worst local SQNR first), with ``--skip`` suggestions."""
    lines = [
        f"per-node output SQNR vs float ({report['batches']} calibration batches), worst own error first"
        " (local: the node fed the float input; cumulative: with every upstream error):"
    ]
    rows = report["nodes"][:limit]
    width = max([len(r["node"]) for r in rows] + [4])
    lines.append(f"  {'node':<{width}}  {'op':<13} {'local dB':>8} {'cumul. dB':>9}  {'cosine':>8}")
    for r in rows:
        own = f"{r['local_sqnr_db']:>8.2f}" if "local_sqnr_db" in r else f"{'-':>8}"
        lines.append(f"  {r['node']:<{width}}  {r['op']:<13} {own} {r['sqnr_db']:>9.2f}  {r['cosine']:>8.5f}")
    if len(report["nodes"]) > limit:
        lines.append(f"  ... {len(report['nodes']) - limit} more in the report JSON")
    suggested = skip_suggestions(report)
    if suggested:
        flags = " ".join(f"--skip '{n}'" for n in suggested)
        lines.append(f"largest own errors ({SKIP_MARGIN_DB:.0f}+ dB below the median): keep them in float with {flags}")
    for o in report["outputs"]:
        lines.append(f"model output {o['name']}: SQNR {o['sqnr_db']:.2f} dB, cosine {o['cosine']:.6f}")
    return "\n".join(lines)
