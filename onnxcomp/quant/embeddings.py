"""Embedding tables (``Gather`` on a constant float table) stored in 8 or 4 bits.

A sentence encoder's file is mostly its token-embedding table, and a table needs no calibration:
only the rows a batch reads are dequantized at run time, so the gather happens first.

* INT8, one scale per row (standard ops, any runtime)::

      Gather(int8 codes, ids) -> Cast(float) * Gather(row scales, ids)

* INT4, one scale per group of ``g`` values along a row: ``com.microsoft.GatherBlockQuantized``
  (onnxruntime's kernel; ``docs/onnxruntime.md#fused-patterns``).

Both dequantize exactly what the codec computes (symmetric codes, zero point 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.framework.base import PassResult
from onnxcomp.ir import WeightLayout
from onnxcomp.quant.qweight import QuantizedWeight
from onnxcomp.quant.record import weight_record
from onnxcomp.quant.spec import TensorSpec
from onnxcomp.quant.weights import quantize_weight

#: Rows are the channels, a row's values the reduction axis (groups run along a row).
ROW_LAYOUT = WeightLayout(channel_axis=0, reduction_axis=1)


def embedding_table(graph: ir.Graph, node: ir.Node) -> np.ndarray | str:
    """The constant float32 2-D table a Gather reads rows of, or why it is not one."""
    if node.op != "Gather" or not ir.is_onnx_op(node):
        return "not a Gather"
    if int(node.attrs.get("axis", 0)) != 0:
        return "gathers along an axis other than 0"
    table = ir.constant_value(node.inputs[0])
    if table is None or ir.is_constant(node.inputs[1]):
        return "not a table lookup (the table must be a constant, the indices not)"
    if table.dtype != np.float32 or table.ndim != 2:
        return f"the table is {table.dtype} with {table.ndim} dims, not a 2-D float32 table"
    if table.shape[0] < 16:
        return f"only {table.shape[0]} rows: too small to be worth it"
    return table


def quantize_table(table: np.ndarray, spec: TensorSpec, name: str) -> QuantizedWeight:
    """The table's codes and scales (per row, or per group along a row)."""
    return quantize_weight(table, spec, ROW_LAYOUT, name)


def emit_embedding(graph: ir.Graph, node: ir.Node, qw: QuantizedWeight) -> str:
    """Rewrite the Gather to read ``qw``; the storage description for the record."""
    base = node.inputs[0].name
    ids, out = node.inputs[1], node.outputs[0]
    const = ir.make_constant
    if qw.block_size:  # 4-bit groups: onnxruntime's GatherBlockQuantized
        data = const(ir.unique_name(graph, f"{base}_quantized"), qw.codes)
        scales = const(ir.unique_name(graph, f"{base}_scale"), np.asarray(qw.scale, np.float32))
        attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": qw.block_size}
        _replace(graph, node, "GatherBlockQuantized", [data, ids, scales], [out], attrs, "com.microsoft")
        return f"{qw.codes.dtype.name} rows, one scale per {qw.block_size} values (GatherBlockQuantized)"
    codes = const(ir.unique_name(graph, f"{base}_quantized"), qw.codes)
    row_scale = const(ir.unique_name(graph, f"{base}_row_scale"), np.asarray(qw.scale, np.float32).reshape(-1, 1))
    rows, scale, values = (ir.make_variable(graph, f"{base}_{s}") for s in ("rows", "scales", "values"))
    _replace(graph, node, "Gather", [codes, ids], [rows], {"axis": 0}, None)
    ir.make_node(graph, "Gather", [row_scale, ids], [scale], f"{base}_scale_Gather", {"axis": 0})
    ir.make_node(graph, "Cast", [rows], [values], f"{base}_Cast", {"to": onnx.TensorProto.FLOAT})
    ir.make_node(graph, "Mul", [values, scale], [out], f"{base}_Mul")
    return f"{qw.codes.dtype.name} rows, one scale per row (Gather, Cast, Mul)"


def _replace(
    graph: ir.Graph,
    node: ir.Node,
    op: str,
    inputs: list[ir.Tensor],
    outputs: list[ir.Tensor],
    attrs: dict,
    domain: str | None,
) -> ir.Node:
    original = node.name
    node.name = ir.unique_name(graph, f"{original}_replaced")
    new = ir.make_node(graph, op, inputs, outputs, f"{original or 'embedding'}_{op}", attrs, domain=domain)
    if original:
        new.name = original
    node.inputs.clear()
    node.outputs.clear()
    return new


def quantize_embeddings(
    graph: ir.Graph, spec: TensorSpec, skip: tuple[str, ...], result: PassResult
) -> list[dict[str, Any]]:
    """Every embedding table of ``graph`` (not matching ``skip``) quantized per ``spec``; their
    record entries, the nodes changed and declined in ``result``."""
    entries = []
    for node in ir.iter_nodes(graph, ("Gather",)):
        table = embedding_table(graph, node)
        if isinstance(table, str):
            continue  # most Gathers are not table lookups: nothing to report
        if ir.match_glob(node.name, skip):
            result.declined.append((node.name, "matches a skip pattern"))
            continue
        name = node.inputs[0].name
        qw = quantize_table(table, spec, name)
        stored = emit_embedding(graph, node, qw)
        entries.append({"node": node.name, "op": "Gather", "weights": weight_record(name, qw, stored)})
        result.changed.append(node.name)
    if entries:
        result.modified = True
        result.stats["embeddings"] = len(entries)
    return entries
