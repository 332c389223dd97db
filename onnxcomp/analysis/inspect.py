"""``onnxcomp inspect``: what is in a model (opset, ops, parameters by dtype, MACs, I/O)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
from onnx import helper

from onnxcomp.analysis.macs import model_macs
from onnxcomp.analysis.sparsity import sparsity_extra
from onnxcomp.ir.roundtrip import iter_graph_protos
from onnxcomp.model_io import default_opset


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class ModelSummary:
    opset: int
    ir_version: int
    producer: str
    file_bytes: int | None
    ops: dict[str, int]
    params_by_dtype: dict[str, dict[str, int]]  # dtype -> {"count", "bytes"}
    macs_by_op: dict[str, int]
    macs_total: int | None
    macs_unknown: list[str]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def param_count(self) -> int:
        return sum(v["count"] for v in self.params_by_dtype.values())

    @property
    def param_bytes(self) -> int:
        return sum(v["bytes"] for v in self.params_by_dtype.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["param_count"] = self.param_count
        data["param_bytes"] = self.param_bytes
        return data


_BITS: dict[int, int] = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.FLOAT4E2M1: 4,
}


def tensor_bits(data_type: int) -> int:
    """Storage bits per element of an ONNX tensor type."""
    if data_type in _BITS:
        return _BITS[data_type]
    return helper.tensor_dtype_to_np_dtype(data_type).itemsize * 8


def _dtype_name(data_type: int) -> str:
    return onnx.TensorProto.DataType.Name(data_type).lower()


def _value_info(value: onnx.ValueInfoProto) -> TensorInfo:
    t = value.type.tensor_type
    shape: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return TensorInfo(value.name, _dtype_name(t.elem_type) if t.elem_type else "?", shape)


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of the main graph and of every If/Loop/Scan body inside it."""
    return [n for _, g in iter_graph_protos(model.graph) for n in g.node]


def _constant_node_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    return next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)


def constant_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers plus the tensor values of Constant nodes (the model's parameters), bodies included."""
    tensors = []
    for _, graph in iter_graph_protos(model.graph):
        tensors.extend(graph.initializer)
        tensors.extend(t for t in map(_constant_node_value, graph.node) if t is not None)
    return tensors


def _named_constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every initializer and Constant-node value by the tensor name nodes read it as."""
    named: dict[str, onnx.TensorProto] = {}
    for _, graph in iter_graph_protos(model.graph):
        named.update((t.name, t) for t in graph.initializer)
        for node in graph.node:
            value = _constant_node_value(node)
            if value is not None and node.output:
                named[node.output[0]] = value
    return named


def summarize(model: onnx.ModelProto, file_bytes: int | None = None) -> ModelSummary:
    nodes = all_nodes(model)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in nodes)
    params: dict[str, dict[str, int]] = {}
    for tensor in constant_tensors(model):
        count = math.prod(tensor.dims)
        entry = params.setdefault(_dtype_name(tensor.data_type), {"count": 0, "bytes": 0})
        entry["count"] += count
        entry["bytes"] += (count * tensor_bits(tensor.data_type) + 7) // 8
    macs_by_op: dict[str, int] = {}
    unknown = []
    for m in model_macs(model):
        if m.macs is None:
            unknown.append(m.name)
        else:
            macs_by_op[m.op] = macs_by_op.get(m.op, 0) + m.macs
    inits = {t.name for t in model.graph.initializer}
    storage = weight_storage(model)
    bodies = len(list(iter_graph_protos(model.graph))) - 1
    inside = len(nodes) - len(model.graph.node)
    body_rows = [f"{bodies} If/Loop/Scan bodies holding {inside} of the {len(nodes)} nodes"] if bodies else []
    if bodies:
        body_rows.append("MACs below count the main graph only (a body may run once, never, or per iteration)")
    return ModelSummary(
        opset=default_opset(model),
        ir_version=model.ir_version,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        file_bytes=file_bytes,
        ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        params_by_dtype=dict(sorted(params.items())),
        macs_by_op=macs_by_op,
        macs_total=sum(macs_by_op.values()) if macs_by_op or not unknown else None,
        macs_unknown=unknown,
        inputs=[_value_info(v) for v in model.graph.input if v.name not in inits],
        outputs=[_value_info(v) for v in model.graph.output],
        extra=({"subgraphs": body_rows} if body_rows else {})
        | ({"weights by storage (Conv/Gemm/MatMul)": storage_rows(storage)} if storage else {})
        | sparsity_extra(model),
    )


def human_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def format_summary(s: ModelSummary, path: str = "") -> str:
    lines = []
    head = f"{path}: " if path else ""
    size = f", file {human_bytes(s.file_bytes)}" if s.file_bytes is not None else ""
    lines.append(f"{head}opset {s.opset}, ir_version {s.ir_version}{size}, producer {s.producer or '?'}")
    lines.append(f"parameters: {human_count(s.param_count)} ({human_bytes(s.param_bytes)})")
    for dtype, v in s.params_by_dtype.items():
        lines.append(f"  {dtype:<12} {v['count']:>12,} values  {human_bytes(v['bytes']):>12}")
    for key, rows in s.extra.items():
        lines.append(f"{key}:")
        lines.extend(f"  {row}" for row in rows)
    if s.macs_total is not None:
        lines.append(f"MACs (batch 1): {human_count(s.macs_total)}")
        for op, n in sorted(s.macs_by_op.items()):
            lines.append(f"  {op:<14} {human_count(n):>10}")
    if s.macs_unknown:
        lines.append(
            f"MACs unknown for {len(s.macs_unknown)} node(s) (shapes not inferable): {', '.join(s.macs_unknown[:5])}"
        )
    lines.append(f"ops ({sum(s.ops.values())} nodes): " + ", ".join(f"{k} {v}" for k, v in s.ops.items()))
    for label, items in (("inputs", s.inputs), ("outputs", s.outputs)):
        lines.append(f"{label}:")
        lines.extend(f"  {t.name}: {t.dtype} {t.shape}" for t in items)
    return "\n".join(lines)


_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def weight_storage(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Stored bits of the Conv/Gemm/MatMul weights, by how they are stored.

    A DequantizeLinear (or lookup-table Gather) over an initializer counts its codes, scales and
    zero points (tables once); a float initializer read directly by a compute op counts as float.
    Returns label -> {"weights": element count, "bits": total stored bits}.
    """
    inits = _named_constants(model)
    nodes = all_nodes(model)
    producers = {out: n for n in nodes for out in n.output if n.op_type != "Constant"}

    def bits(name: str) -> int:
        t = inits.get(name)
        return math.prod(t.dims) * tensor_bits(t.data_type) if t is not None else 0

    def codes_of(name: str) -> tuple[str | None, str, int]:
        """(codes initializer, storage label, extra table bits) behind a tensor."""
        if name in inits:
            return name, _dtype_name(inits[name].data_type), 0
        node = producers.get(name)
        if node is not None and node.op_type == "Cast" and node.input[0] in inits:  # FP8 codes (cast form)
            return node.input[0], _dtype_name(inits[node.input[0]].data_type), 0
        if node is not None and node.op_type == "Gather" and node.input[0] in inits:
            idx = producers.get(node.input[1])
            src = idx.input[0] if idx is not None and idx.op_type == "Cast" else node.input[1]
            if src in inits:
                return (
                    src,
                    f"{_dtype_name(inits[src].data_type)} + {math.prod(inits[node.input[0]].dims)}-entry table",
                    bits(node.input[0]),
                )
        return None, "", 0

    out: dict[str, dict[str, int]] = {}
    seen_tables: set[str] = set()
    weight_inputs = {
        n.input[i] for n in nodes if n.op_type in _WEIGHT_OPS for i in [_WEIGHT_OPS[n.op_type]] if len(n.input) > i
    }
    for node in nodes:
        if node.op_type == "DequantizeLinear" and node.output[0] in weight_inputs | _feeds_mul(nodes, weight_inputs):
            src, label, table_bits = codes_of(node.input[0])
            extra = sum(bits(n) for n in node.input[1:])
            scale_node = producers.get(node.input[1])
            if scale_node is not None and scale_node.op_type == "DequantizeLinear":  # two-level scales
                extra += sum(bits(n) for n in scale_node.input)
        elif node.op_type == "Mul" and node.output[0] in weight_inputs:
            src, label, table_bits = codes_of(node.input[0])
            scale = producers.get(node.input[1])  # block scales expanded by a Gather (cast form): the stored scales
            extra = bits(scale.input[0] if scale is not None and scale.op_type == "Gather" else node.input[1])
        else:
            continue
        if src is None:
            continue
        entry = out.setdefault(label, {"weights": 0, "bits": 0})
        entry["weights"] += math.prod(inits[src].dims)
        entry["bits"] += bits(src) + extra
        table = producers.get(node.input[0])
        if table_bits and table is not None and table.input[0] not in seen_tables:
            seen_tables.add(table.input[0])
            entry["bits"] += table_bits
    for node in nodes:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            attrs = {a.name: a.i for a in node.attribute}
            entry = out.setdefault(f"MatMulNBits {attrs.get('bits', 4)}-bit", {"weights": 0, "bits": 0})
            entry["weights"] += attrs.get("K", 0) * attrs.get("N", 0)
            entry["bits"] += sum(bits(i) for i in node.input[1:4] if i)
    for name in weight_inputs:
        if name in inits and inits[name].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            entry = out.setdefault(f"{_dtype_name(inits[name].data_type)} (not quantized)", {"weights": 0, "bits": 0})
            entry["weights"] += math.prod(inits[name].dims)
            entry["bits"] += bits(name)
    return out


def _feeds_mul(nodes: list[onnx.NodeProto], weight_inputs: set[str]) -> set[str]:
    """Outputs of DequantizeLinear nodes that reach a weight through one Mul (two-level scales)."""
    return {n.input[0] for n in nodes if n.op_type == "Mul" and n.output[0] in weight_inputs}


def storage_rows(storage: dict[str, dict[str, int]]) -> list[str]:
    rows = []
    for label, v in sorted(storage.items()):
        per = v["bits"] / v["weights"] if v["weights"] else 0.0
        rows.append(
            f"{label:<34} {v['weights']:>12,} weights  {per:6.2f} bits/weight  {human_bytes(v['bits'] / 8):>12}"
        )
    return rows
