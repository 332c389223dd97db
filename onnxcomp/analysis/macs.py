"""Shapes and multiply-accumulate counts of Conv, ConvTranspose, Gemm and MatMul nodes.

Symbolic dimensions of graph inputs are taken as 1 (a batch of one) for the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import shape_inference

from onnxcomp.runtime import PROTOBUF_LIMIT

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class NodeMacs:
    name: str
    op: str
    macs: int | None  # None when the shapes are unknown


def infer_static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> shape (None for an unknown dim), with symbolic input dims set to 1."""
    if model.ByteSize() >= PROTOBUF_LIMIT:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for value in probe.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value") or dim.dim_value <= 0:  # symbolic, unknown or -1
                dim.Clear()
                dim.dim_value = 1
    # Large weights are only needed for their shapes: drop their data to keep inference cheap
    # (small ones stay: Reshape/Slice shape inputs must keep their values).
    for init in probe.graph.initializer:
        if math.prod(init.dims) > 4096:
            name, dtype, dims = init.name, init.data_type, list(init.dims)
            init.Clear()
            init.name, init.data_type = name, dtype
            init.dims.extend(dims)
    shapes: dict[str, list[int | None]] = {}
    try:
        inferred = shape_inference.infer_shapes(probe, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - a failed inference only means "unknown"
        inferred = probe
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _static(shape: list[int | None] | None) -> list[int] | None:
    """``shape`` if it is known and has no unknown dim, else None."""
    if shape is None:
        return None
    dims = [d for d in shape if d is not None]
    return dims if len(dims) == len(shape) else None


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int | None:
    """MACs of one node from known shapes, or None."""
    ins = [shapes.get(n) for n in node.input]
    out = _static(shapes.get(node.output[0]) if node.output else None)
    if node.op_type == "Conv":
        w = _static(ins[1] if len(ins) > 1 else None)
        if w is None or out is None:
            return None
        group = _attr(node, "group", 1)
        cout, cin_g, *kernel = w
        return out[0] * cout * math.prod(out[2:]) * cin_g * math.prod(kernel) if group > 0 else None
    if node.op_type == "ConvTranspose":
        x, w = _static(ins[0]), _static(ins[1] if len(ins) > 1 else None)
        if x is None or w is None:
            return None
        cin, cout_g, *kernel = w
        return x[0] * cin * math.prod(x[2:]) * cout_g * math.prod(kernel)
    if node.op_type == "Gemm":
        a, b = _static(ins[0]), _static(ins[1] if len(ins) > 1 else None)
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return m * k * n
    if node.op_type == "MatMul":
        a, b = _static(ins[0]), _static(ins[1] if len(ins) > 1 else None)
        if a is None or b is None or not a or not b:
            return None
        a2 = [1] + a if len(a) == 1 else a
        b2 = b + [1] if len(b) == 1 else b
        batch = math.prod(_broadcast(a2[:-2], b2[:-2]))
        return batch * a2[-2] * a2[-1] * b2[-1]
    return None


def _broadcast(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + a
    b = [1] * (n - len(b)) + b
    return [max(x, y) for x, y in zip(a, b, strict=True)]


def model_macs(model: onnx.ModelProto) -> list[NodeMacs]:
    """MACs of every Conv/ConvTranspose/Gemm/MatMul node (None where shapes are unknown)."""
    shapes = infer_static_shapes(model)
    return [
        NodeMacs(node.name or node.output[0], node.op_type, node_macs(node, shapes))
        for node in model.graph.node
        if node.op_type in MAC_OPS
    ]


def with_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have the given static shapes (for MAC counts)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shapes[value.name]:
                dims.add().dim_value = int(size)
    return fixed


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """``NAME=D1,D2,...`` (as ``--input-shape`` takes it) -> (name, dims); ValueError saying what is wrong."""
    name, sep, dims = text.rpartition("=")
    try:
        sizes = [int(d) for d in dims.split(",")] if sep and name else []
    except ValueError:
        sizes = []
    if not sizes or any(d <= 0 for d in sizes):
        raise ValueError(f"expected NAME=D1,D2,... with positive sizes, e.g. input=1,3,224,224; got {text!r}")
    return name, sizes
