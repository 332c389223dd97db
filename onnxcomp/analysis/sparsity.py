"""Per-weight sparsity: zero fraction and n:m pattern coverage (``onnxcomp inspect``, quant records).

Works on ModelProtos (no graph import): a layer's weight is its constant input 1, or the codes of
a ``DequantizeLinear`` feeding input 1 (a quantized weight is zero where its code equals the zero
point, so sparse+quantized models report the same sparsity as before quantization).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.formats.nbits import unpack_rows
from onnxcomp.formats.nm import NMPattern, nonzero_mask, nonzero_mask_fraction
from onnxcomp.ir import reduction_axis

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEFAULT_PATTERN = NMPattern(2, 4)
#: Weights with fewer zeros than this are reported as dense by ``inspect``.
REPORT_MIN_ZEROS = 0.01


def weight_sparsity(w: np.ndarray, axis: int | None = None, pattern: NMPattern = DEFAULT_PATTERN) -> dict[str, Any]:
    """``{"zero_fraction", "pattern", "pattern_fraction", "axis"}`` of one weight.

    ``pattern_fraction`` is the fraction of groups along ``axis`` satisfying ``pattern``;
    ``pattern`` is its name when all do (and the axis is long enough to be sparsified), else None.
    Without ``axis`` the likely reduction axes are tried (1, and 0 for a 2-D weight) and the best
    is reported (the quantizer's record does not know the layer's layout).
    """
    values = np.asarray(w)
    mask = nonzero_mask(values)  # once for every axis tried
    nonzero = int(np.count_nonzero(mask))
    zeros = (values.size - nonzero) / values.size if values.size else 0.0
    dense = values.size > 0 and nonzero == values.size  # most weights: no group to count
    axes = [axis] if axis is not None else ([1, 0] if values.ndim == 2 else [1] if values.ndim > 1 else [0])
    best_axis, best = axes[0], -1.0
    for a in axes:
        frac = _dense_nm_fraction(values.shape[a], pattern) if dense else nonzero_mask_fraction(mask, a, pattern)
        if frac > best:
            best_axis, best = a, frac
    holds = best == 1.0 and zeros > 0 and values.shape[best_axis] > pattern.n
    return {
        "zero_fraction": round(zeros, 6),
        "pattern": str(pattern) if holds else None,
        "pattern_fraction": round(best, 6),
        "axis": int(best_axis),
    }


def _dense_nm_fraction(length: int, pattern: NMPattern) -> float:
    """``nm_fraction`` of a weight without zeros: only a last group that the zero padding fills
    beyond ``m - n`` holds, once per row, i.e. the fraction 1 / groups or 0 (the same float)."""
    groups, tail = -(-length // pattern.m), length % pattern.m
    return 1 / groups if 0 < tail <= pattern.n else 0.0


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    table = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    table[node.output[0]] = attr.t
    return table


def _matmulnbits_zeros(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """Where a MatMulNBits weight is exactly zero, in MatMul layout ``(K, N)`` (None if unknown)."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attrs.get("K", 0), attrs.get("N", 0), attrs.get("bits", 4), attrs.get("block_size", 0)
    if node.input[1] not in constants or not (k and n and block):
        return None
    blocks = -(-k // block)
    codes = unpack_rows(ir.tensor_values(constants[node.input[1]]).reshape(n, blocks, -1), bits, block)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    if zp_name:
        if zp_name not in constants or constants[zp_name].data_type != onnx.TensorProto.UINT8:
            return None
        zp = unpack_rows(ir.tensor_values(constants[zp_name]).reshape(n, -1), bits, blocks)
    else:
        zp = np.full((n, blocks), 1 << (bits - 1), np.uint8)
    zero = codes == zp[:, :, None]
    return zero.reshape(n, blocks * block)[:, :k].T


def _dequantized_zeros(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """Where the output of a DequantizeLinear of constant codes is exactly zero (None if unknown)."""
    if node.input[0] not in constants:
        return None
    codes = ir.tensor_values(constants[node.input[0]]).astype(np.int64)
    zp_name = node.input[2] if len(node.input) > 2 else ""
    zp = ir.tensor_values(constants[zp_name]).astype(np.int64) if zp_name in constants else None
    if zp is None or not zp.any():
        return codes == 0
    if zp.size == 1:
        return codes == zp.reshape(-1)[0]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % codes.ndim
    if zp.ndim != 1 or zp.size != codes.shape[axis] or any(a.name == "block_size" and a.i for a in node.attribute):
        return None
    return codes == zp.reshape([-1 if i == axis else 1 for i in range(codes.ndim)])


def layer_weights(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, np.ndarray]]:
    """(node, weight name, weight or zero-mask array) of every layer with a constant weight."""
    constants = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        nbits = node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
        if (node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx")) and not nbits or len(node.input) < 2:
            continue
        name = node.input[1]
        if node.op_type == "MatMulNBits":
            zero = _matmulnbits_zeros(node, constants)
            if zero is not None:
                out.append((node, name, np.where(zero, 0.0, 1.0)))
            continue
        if name in constants:
            value = ir.tensor_values(constants[name])
            if value.dtype.kind == "f":
                out.append((node, name, value))
            continue
        dq = producers.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            zero = _dequantized_zeros(dq, constants)
            if zero is not None:
                out.append((node, dq.input[0], np.where(zero, 0.0, 1.0)))
    return out


def sparsity_extra(model: onnx.ModelProto) -> dict[str, list[str]]:
    """``inspect`` rows: one per layer weight with at least 1 % zeros (empty dict for dense models)."""
    rows = []
    for node, name, w in layer_weights(model):
        if w.ndim < 2:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        op = "MatMul" if node.op_type == "MatMulNBits" else node.op_type  # its zero mask is in MatMul layout
        info = weight_sparsity(w, reduction_axis(op, w.ndim, trans_b))
        if info["zero_fraction"] < REPORT_MIN_ZEROS:
            continue
        pattern = f", 2:4 on {info['pattern_fraction']:.1%} of groups"
        label = f"{node.name or node.output[0]} ({node.op_type} {name})"
        rows.append(f"{label}: {info['zero_fraction']:.1%} zeros{pattern}")
    return {"sparsity (weights with zeros)": rows} if rows else {}
