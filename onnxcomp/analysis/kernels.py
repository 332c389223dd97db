"""Which kernel onnxruntime really runs for each quantized node (``docs/onnxruntime.md#fused-patterns``).

A quantized model is for deployment, so the file is not the answer: onnxruntime's CPU provider
fuses Q/DQ node units into integer kernels at ``ORT_ENABLE_ALL`` only when the whole unit matches
(weights, inputs *and* outputs quantized, supported types). :func:`kernel_report` loads the model
the way a user would, saves onnxruntime's optimized graph, and finds each quantized node in it:
ORT keeps the original node's name on the fused node (``conv1``, or ``conv1_token_7`` after a
layout change), so the match is by name. A node that still runs a float Conv/MatMul/Gemm is
*left in float*; the report says why when the quantized model shows it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import onnx

from onnxcomp.runtime import ort_session

#: Kernels that compute in integers (or with packed low-bit weights) on ORT's CPU provider.
INTEGER_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "MatMulNBits",
        "QLinearConvTranspose",
        "QAttention",
        "GatherBlockQuantized",
    }
)
_FLOAT_COMPUTE = frozenset({"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"})


@dataclass(frozen=True)
class NodeKernel:
    """How one quantized node runs: ``kernel`` is the op type ORT executes for it."""

    node: str
    op: str
    kernel: str
    integer: bool
    reason: str = ""


def _optimized_graph(model: onnx.ModelProto, config: Mapping[str, str] | None) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="onnxcomp-kernels-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        ort_session(model, level="all", threads=1, config=dict(config or {}), optimized_path=path)
        return onnx.load(path, load_external_data=False)


def _by_original_name(optimized: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in optimized.graph.node:
        base = re.sub(r"(_token_\d+)+$", "", node.name)
        found.setdefault(base, []).append(node)
    return found


def _names_ort_may_use(
    node: onnx.NodeProto | None, name: str, readers: Mapping[str, list[onnx.NodeProto]]
) -> list[str]:
    """The node's own name, then the names ORT's layout transformers give the node it becomes: NCHWc
    names a fused float Conv after the output of the last op it absorbed (``relu1_out_nchwc``)."""
    keys = [name]
    tensor = node.output[0] if node is not None and node.output else None
    for _ in range(4):
        if tensor is None:
            break
        keys += [f"{tensor}_nchwc", tensor]
        nxt = readers.get(tensor, [])
        single = len(nxt) == 1 and nxt[0].output and nxt[0].op_type not in _FLOAT_COMPUTE
        tensor = nxt[0].output[0] if single else None  # never walk into the next compute node
    return keys


def _float_reason(node: onnx.NodeProto, model: onnx.ModelProto, emulated: str | None) -> str:
    """Why a quantized node stayed in float, read from the quantized model's node unit."""
    if emulated:
        return f"{emulated} has no integer kernel on onnxruntime's CPU provider: emulated in float"
    if node.op_type == "ConvTranspose":
        return "onnxruntime's CPU provider has no integer ConvTranspose kernel"
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    x = producers.get(node.input[0]) if node.input else None
    if x is None or x.op_type != "DequantizeLinear":
        w = producers.get(node.input[1]) if len(node.input) > 1 else None
        if w is not None and w.op_type == "Mul":  # Cast(FP8 codes) / Gather(HiF8 table) * scale
            return "its input is not quantized (weight-only, a float format: decoded once at session load)"
        return "its input is not quantized (weight-only: the weight is dequantized at every run)"
    outs = readers.get(node.output[0], [])
    if node.output[0] in {o.name for o in model.graph.output}:
        return "its output is a graph output in float"
    if not any(r.op_type == "QuantizeLinear" for r in outs) and not (
        len(outs) == 1 and outs[0].op_type in ("Relu", "Clip") and _feeds_q(outs[0], readers)
    ):
        kinds = ", ".join(sorted({r.op_type for r in outs})) or "nothing"
        return f"its output is not quantized (read by {kinds})"
    shared = _shared_int8_activation(node, model, producers, readers)
    if shared:
        return (
            f"int8 activation {shared!r} has several readers: onnxruntime on x86 fuses int8 activations only "
            "where a tensor has one reader; use uint8 activations"
        )
    return "onnxruntime did not fuse this node unit (types or attributes its selectors reject)"


def _shared_int8_activation(
    node: onnx.NodeProto,
    model: onnx.ModelProto,
    producers: Mapping[str, onnx.NodeProto],
    readers: Mapping[str, list[onnx.NodeProto]],
) -> str | None:
    """The int8 Q/DQ activation around ``node`` that more than one node reads, if any."""
    int8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    dqs = [producers.get(node.input[0])] if node.input else []
    dqs += [
        r2
        for q in readers.get(node.output[0], [])
        if q.op_type == "QuantizeLinear"
        for r2 in readers.get(q.output[0], [])
    ]
    for dq in dqs:
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or dq.input[2] not in int8:
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        fan_out = sum(len(readers.get(d.output[0], [])) for d in readers.get(q.output[0], []))
        if fan_out > 1:
            return q.input[0]
    return None


def _feeds_q(node: onnx.NodeProto, readers: Mapping[str, list[onnx.NodeProto]]) -> bool:
    return any(r.op_type == "QuantizeLinear" for r in readers.get(node.output[0], []))


def kernel_report(
    model: onnx.ModelProto,
    nodes: Iterable[tuple[str, str, str | None]],
    config: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Per quantized node ``(name, op, emulated format or None)``: the kernel ORT runs it with.

    Returns ``{"nodes": [...], "integer": n, "float": n, "counts": {kernel: n}}``; ``config`` are
    session config entries (e.g. ``session.qdq_matmulnbits_accuracy_level``).
    """
    optimized = _optimized_graph(model, config)
    by_name = _by_original_name(optimized)
    original = {n.name: n for n in model.graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    rows = []
    for name, op, emulated in nodes:
        compute = [
            n
            for key in _names_ort_may_use(original.get(name), name, readers)
            for n in by_name.get(key, [])
            if n.op_type in INTEGER_KERNELS or n.op_type in _FLOAT_COMPUTE
        ]
        if not compute:
            rows.append(
                NodeKernel(name, op, "(not found)", False, "onnxruntime's optimized graph has no node of this name")
            )
            continue
        kernel = compute[0].op_type
        if kernel in INTEGER_KERNELS:
            rows.append(NodeKernel(name, op, kernel, True))
        else:
            reason = _float_reason(original[name], model, emulated) if name in original else ""
            rows.append(NodeKernel(name, op, kernel, False, reason))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.kernel] = counts.get(r.kernel, 0) + 1
    integer = sum(r.integer for r in rows)
    return {
        "nodes": [asdict(r) for r in rows],
        "integer": integer,
        "float": len(rows) - integer,
        "counts": dict(sorted(counts.items())),
    }


def format_kernel_report(report: Mapping[str, Any], limit: int = 20) -> str:
    """One line of counts, then every quantized node left in float with the reason."""
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
    lines = [
        f"onnxruntime kernels (CPU, ORT_ENABLE_ALL): {report['integer']} integer, {report['float']} float ({counts})"
    ]
    left = [r for r in report["nodes"] if not r["integer"]]
    for r in left[:limit]:
        lines.append(f"  left in float: {r['node']} ({r['op']} -> {r['kernel']}): {r['reason']}")
    if len(left) > limit:
        lines.append(f"  ... {len(left) - limit} more in the report JSON")
    return "\n".join(lines)
