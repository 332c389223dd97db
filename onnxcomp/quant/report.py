"""Quantization report: per-node output SQNR against the float model, worst first.

Both models run on the same calibration batches with every compared tensor exposed as an extra
output; sums of signal and noise power are accumulated per tensor, so memory does not grow with
the number of batches.

Two figures per node: the *cumulative* SQNR (the node's output in the quantized model, carrying
every upstream error) and the *local* SQNR (the quantized node fed the float model's input, so
it isolates the node: the one to look at when choosing what to ``--skip``). The local figures
come from one extra session over a *local model*: a copy of each quantized node with the Q/DQ
and weight nodes it reads, whose inputs are the float model's tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from onnxcomp.runtime import ALL_CORES, ort_session, with_outputs

_LOCAL = "__local"


def local_model(
    float_model: onnx.ModelProto, quant_model: onnx.ModelProto, tensors: list[str]
) -> onnx.ModelProto | None:
    """A model computing each quantized node's output ``t`` as ``t + "__local"`` from float tensors.

    For each ``t``, the nodes of ``quant_model`` between ``t`` and the tensors the float model also
    has (its activation inputs, before their Q/DQ) are copied, with internal names made unique per
    copy; those float tensors become the graph inputs. None when nothing can be isolated.
    """
    g = quant_model.graph
    float_names = {i.name for i in float_model.graph.input} | {o for n in float_model.graph.node for o in n.output}
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    nodes: list[onnx.NodeProto] = []
    inputs: dict[str, None] = {}
    used_inits: dict[str, None] = {}
    outputs = []
    for k, t in enumerate(tensors):
        if t not in producer or t not in float_names:
            continue
        rename = {t: t + _LOCAL}
        copied: list[onnx.NodeProto] = []
        stack, seen = [producer[t]], set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            copied.append(node)
            for x in node.input:
                if not x or x in inits:
                    if x:
                        used_inits[x] = None
                    continue
                if x in float_names or x not in producer:
                    inputs[x] = None
                    continue
                rename.setdefault(x, f"{x}__l{k}")
                stack.append(producer[x])
        for node in reversed(copied):
            c = onnx.NodeProto()
            c.CopyFrom(node)
            c.name = f"{node.name}__l{k}"
            c.input[:] = [rename.get(x, x) for x in node.input]
            c.output[:] = [rename.get(o, f"{o}__l{k}") if o else o for o in node.output]
            nodes.append(c)
        outputs.append(onnx.helper.make_empty_tensor_value_info(t + _LOCAL))
    if not outputs:
        return None
    types = {v.name: v for v in [*float_model.graph.input, *float_model.graph.value_info, *float_model.graph.output]}
    # activations entering a Q are float; an undeclared one is typed float32 (a wrong guess only
    # costs the local figures: the session is not created and the report says nothing local)
    graph_inputs = [types.get(n) or onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in inputs]
    graph = onnx.helper.make_graph(nodes, "local", graph_inputs, outputs, [inits[n] for n in used_inits])
    model = onnx.helper.make_model(graph, opset_imports=quant_model.opset_import, ir_version=quant_model.ir_version)
    return model


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
    local = local_model(float_model, quant_model, tensors)
    local_inputs = [i.name for i in local.graph.input] if local is not None else []
    fed = {i.name for i in float_model.graph.input}  # graph inputs come from the batch itself
    exposed = list(dict.fromkeys(names + [n for n in local_inputs if n not in fed]))
    ref_sess = ort_session(with_outputs(float_model, exposed), level="disable", threads=ALL_CORES)
    test_sess = ort_session(with_outputs(quant_model, names), level="disable", threads=ALL_CORES)
    local_sess = None
    if local is not None:
        try:
            local_sess = ort_session(local, level="disable", threads=ALL_CORES)
        except Exception:  # noqa: BLE001 - no local figures rather than no report
            local, local_inputs = None, []
    local_names = [o.name for o in local.graph.output] if local is not None else []
    accs = {n: _Acc() for n in names}
    local_accs = {n: _Acc() for n in local_names}
    seen = 0
    for batch in batches:
        if seen >= max_batches:
            break
        feeds = dict(batch)
        refs = dict(zip(exposed, ref_sess.run(exposed, feeds), strict=True))
        refs.update({n: feeds[n] for n in local_inputs if n in fed})
        for name, test in zip(names, test_sess.run(names, feeds), strict=True):
            if np.issubdtype(np.asarray(refs[name]).dtype, np.floating):
                accs[name].add(np.asarray(refs[name]), np.asarray(test))
        if local_sess is not None:
            outs = local_sess.run(local_names, {n: refs[n] for n in local_inputs})
            for name, test in zip(local_names, outs, strict=True):
                local_accs[name].add(np.asarray(refs[name[: -len(_LOCAL)]]), np.asarray(test))
        seen += 1
    nodes = [
        {
            "node": node_outputs[t][0],
            "op": node_outputs[t][1],
            "tensor": t,
            "sqnr_db": round(accs[t].sqnr(), 3),
            "cosine": round(accs[t].cosine(), 6),
            **({"local_sqnr_db": round(local_accs[t + _LOCAL].sqnr(), 3)} if t + _LOCAL in local_accs else {}),
        }
        for t in tensors
    ]
    nodes.sort(key=lambda r: (r.get("local_sqnr_db", r["sqnr_db"]), r["sqnr_db"], r["node"]))
    outs = [
        {"name": o, "sqnr_db": round(accs[o].sqnr(), 3), "cosine": round(accs[o].cosine(), 6)}
        for o in outputs
        if o in float_outs
    ]
    return {"batches": seen, "nodes": nodes, "outputs": outs}


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
