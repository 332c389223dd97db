"""Where ``quantize`` stored each weight in its output, and how the export rewrites it.

Every weight storage the export handles reads back as ``(code - zero point) * scale`` per element
(``onnxcomp.quant.lowbit``): integer codes for DequantizeLinear, FP8 codes, FP4 values stored as
INT8 codes ``2 * v`` (E1M2: INT4 ``4 * v``), MX blocks (the same codes under power-of-two block
scales), HiF8's uint8 codes through a 256-entry table, and the packed codes of MatMulNBits. So the
module fake-quantizes on the sorted grid of *stored* codes with the stored scale, and the export
writes codes on that grid in the storage ``quantize`` chose. Declined with a reason: the uint4
lookup storage of FP4 and two-level (FP8 group) scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.errors import ConfigError
from onnxcomp.formats import ElementFormat, Format, IntegerFormat, MXFormat, get_format
from onnxcomp.ir.mapped import tensor_values
from onnxcomp.quant.lowbit import INT_FACTOR
from onnxcomp.quant.matmulnbits import pack_weight
from onnxcomp.quant.qweight import QuantizedWeight

#: numpy dtypes of integer code storages (ml_dtypes' 4-bit types included)
_INTEGER_STORAGE = ("int4", "uint4", "int8", "uint8", "int16", "uint16")


@dataclass
class WeightStorage:
    """One quantized weight in the PTQ output: initializer names and the grid of its stored codes."""

    kind: str  # "dq" (codes -> DequantizeLinear), "lut" (HiF8 uint8 codes -> table -> Mul), "matmulnbits",
    # "lut_dq" (FP4 uint4 codes -> 16-entry INT8 table -> DequantizeLinear), "dq2" (two-level scales),
    # "integer_kernel" (ConvInteger / MatMulInteger of dynamic per-tensor activations)
    codes: str  # initializer of the codes (MatMulNBits: the packed B)
    scale: str
    zero_point: str | None
    codes_dtype: np.dtype[Any]  # dtype of the unpacked stored codes
    grid: np.ndarray | None  # sorted stored-code values of an element format; None: the integer grid
    learn_scale: bool  # False for MX, whose block scales are powers of two
    transposed: bool = False  # MatMulNBits / MatMulInteger of a Gemm with transB = 1
    folded_bias: str | None = None  # MatMulNBits / integer kernel: the initializer holding the node's bias
    float_bias: str | None = None  # ... and that bias's name in the float model (a trained parameter)
    fixed_scale: np.ndarray | None = None  # dq2: the per-group scale the element DQ reads (not learned)


def element_format(dtype: str) -> Format:
    """The per-element format of ``dtype`` (an MX format's element format)."""
    fmt = get_format(dtype)
    return fmt.element if isinstance(fmt, MXFormat) else fmt


def stored_grid(dtype: str, codes_dtype: np.dtype[Any]) -> np.ndarray | None:
    """Sorted stored-code values of element format ``dtype`` in a ``codes_dtype`` storage (None: integer format)."""
    fmt = element_format(dtype)
    if isinstance(fmt, IntegerFormat):
        return None
    assert isinstance(fmt, ElementFormat)
    values = np.unique(fmt.values[np.isfinite(fmt.values)]).astype(np.float64)
    if fmt.name in INT_FACTOR and codes_dtype.name in _INTEGER_STORAGE:
        values = values * INT_FACTOR[fmt.name]  # FP4 values stored as exact integer multiples
    return values.astype(np.float32)


def _nbits_codes_dtype(dtype: str) -> np.dtype[Any]:
    """The stored-code dtype ``quantize`` packs into MatMulNBits for weight format ``dtype``."""
    fmt = element_format(dtype)
    if isinstance(fmt, IntegerFormat):
        return np.dtype({"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}.get(fmt.name, fmt.storage_dtype))
    return np.dtype(ml_dtypes.int4 if fmt.name == "fp4_e1m2" else np.int8)


def find_storage(
    q: onnx.ModelProto,
    entry: dict[str, Any],
    float_node: onnx.NodeProto,
    nodes: dict[str, onnx.NodeProto],
    inits: dict[str, onnx.TensorProto],
) -> WeightStorage:
    """The storage of ``entry``'s weight in the PTQ model ``q``, or a one-line ConfigError saying why not."""
    w = entry["weights"]
    name, where = w["tensor"], f"node {entry.get('node')!r}: weight {w['tensor']!r}"
    learn_scale = not isinstance(get_format(w["dtype"]), MXFormat)
    if entry.get("kernel") == "MatMulNBits":
        node = nodes[entry["node"]]
        zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
        dtype = _nbits_codes_dtype(w["dtype"])
        transposed = float_node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in float_node.attribute)
        bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
        gemm_bias = float_node.input[2] if float_node.op_type == "Gemm" and len(float_node.input) > 2 else None
        grid = stored_grid(w["dtype"], dtype)
        return WeightStorage(
            "matmulnbits",
            node.input[1],
            node.input[2],
            zp,
            dtype,
            grid,
            learn_scale,
            transposed,
            bias,
            gemm_bias or None,
        )
    integer_kernel = nodes.get(entry["node"])
    if integer_kernel is not None and integer_kernel.op_type in ("ConvInteger", "MatMulInteger"):
        return _integer_kernel_storage(entry, float_node, integer_kernel, nodes, inits, where)
    dq = nodes.get(f"{name}_DequantizeLinear")
    if dq is not None:
        int8 = np.dtype(np.int8)
        zp = dq.input[2] if len(dq.input) > 2 else None
        if dq.input[0] not in inits:  # FP4 as uint4 codes -> Cast -> Gather(INT8 table of f * v) -> DQ
            cast = nodes.get(f"{name}_Cast")
            if cast is None or cast.input[0] not in inits or dq.input[1] not in inits:
                raise ConfigError(
                    f"{where}: stored as {w['stored_as']!r}, which quantization-aware training cannot export"
                )
            grid = stored_grid(w["dtype"], int8)
            return WeightStorage("lut_dq", cast.input[0], dq.input[1], zp, int8, grid, learn_scale)
        if dq.input[1] not in inits:  # two-level: the element DQ's scale is DQ(FP8 group scales, channel scales)
            group = nodes.get(f"{name}_group_scale_DequantizeLinear")
            if group is None or group.output[0] != dq.input[1] or not all(i in inits for i in group.input[:2]):
                raise ConfigError(
                    f"{where}: stored as {w['stored_as']!r}, which quantization-aware training cannot export"
                )
            codes_dtype = tensor_values(inits[dq.input[0]]).dtype
            fixed = _dequantize(group, inits)
            grid = stored_grid(w["dtype"], codes_dtype)
            return WeightStorage("dq2", dq.input[0], dq.input[1], zp, codes_dtype, grid, False, fixed_scale=fixed)
        codes_dtype = tensor_values(inits[dq.input[0]]).dtype
        return WeightStorage(
            "dq", dq.input[0], dq.input[1], zp, codes_dtype, stored_grid(w["dtype"], codes_dtype), learn_scale
        )
    mul, cast = nodes.get(f"{name}_Mul"), nodes.get(f"{name}_Cast")
    if mul is not None and cast is not None and w["dtype"] == "hif8":
        return WeightStorage(
            "lut", cast.input[0], mul.input[1], None, np.dtype(np.uint8), stored_grid("hif8", np.dtype(np.uint8)), True
        )
    if mul is not None and cast is not None and cast.input[0] in inits:
        # FP8 / MXFP8 codes as Cast(codes) * scale (float_weight_format "cast"; blocks: the scale through a Gather)
        gather = nodes.get(f"{name}_scale_Gather")
        scale = gather.input[0] if gather is not None and mul.input[1] == gather.output[0] else mul.input[1]
        if scale in inits:
            codes_dtype = tensor_values(inits[cast.input[0]]).dtype
            grid = stored_grid(w["dtype"], codes_dtype)
            return WeightStorage("dq", cast.input[0], scale, None, codes_dtype, grid, learn_scale)
    raise ConfigError(f"{where}: stored as {w['stored_as']!r}, which quantization-aware training cannot export")


def _integer_kernel_storage(
    entry: dict[str, Any],
    float_node: onnx.NodeProto,
    kernel: onnx.NodeProto,
    nodes: dict[str, onnx.NodeProto],
    inits: dict[str, onnx.TensorProto],
    where: str,
) -> WeightStorage:
    """Dynamic per-tensor activations' fused form (``quant.dynamic.emit_dynamic_tensor``).

    ``ConvInteger / MatMulInteger(x_q, codes, x_zp, w_zp) * (x_scale * w_scale) [+ bias]``: the codes
    are the kernel's second input (a Gemm with transB = 1 transposed), the weight scale the second
    input of ``NODE_scales_Mul``, the float bias that of ``NODE_bias_Add``.
    """
    scales = nodes.get(f"{entry['node']}_scales_Mul")
    if scales is None or kernel.input[1] not in inits or scales.input[1] not in inits:
        raise ConfigError(
            f"{where}: stored as {entry['weights']['stored_as']!r} in a fused integer kernel "
            "whose weight scale QAT cannot find; quantize without --dynamic-granularity tensor"
        )
    bias_add = nodes.get(f"{entry['node']}_bias_Add")
    bias = bias_add.input[1] if bias_add is not None and bias_add.input[1] in inits else None
    float_bias = float_node.input[2] if len(float_node.input) > 2 and float_node.input[2] else None
    transposed = float_node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in float_node.attribute)
    codes_dtype = tensor_values(inits[kernel.input[1]]).dtype
    return WeightStorage(
        "integer_kernel",
        kernel.input[1],
        scales.input[1],
        None,  # the weight zero point stays (symmetric int8: zeros)
        codes_dtype,
        None,
        True,
        transposed,
        bias,
        float_bias if bias is not None else None,
    )


def _dequantize(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """What a per-tensor / per-axis DequantizeLinear of constant float codes (zero point 0) computes."""
    codes = tensor_values(inits[node.input[0]]).astype(np.float32)
    scale = tensor_values(inits[node.input[1]]).astype(np.float32)
    if scale.ndim == 1 and scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % codes.ndim
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return np.multiply(codes, scale, dtype=np.float32)


def stored_codes(storage: WeightStorage, dtype: str, values: np.ndarray) -> np.ndarray:
    """Stored-code values on ``storage.grid`` (float) as the array the storage holds."""
    if storage.kind == "lut":
        fmt = element_format(dtype)
        assert isinstance(fmt, ElementFormat)
        return fmt.encode(values.astype(np.float32)).astype(np.uint8)
    if storage.kind == "lut_dq":  # the 4-bit E2M1 codes of the INT8 table's entries f * v
        fmt = element_format(dtype)
        assert isinstance(fmt, ElementFormat)
        v = np.divide(values, np.float32(INT_FACTOR[fmt.name]), dtype=np.float32)
        return fmt.encode(v).astype(np.uint8).astype(ml_dtypes.uint4)
    if storage.codes_dtype.name in _INTEGER_STORAGE:
        ints = np.rint(values).astype(np.int32)
        wide = np.int8 if storage.codes_dtype.name == "int4" else np.uint8
        small = storage.codes_dtype.name in ("int4", "uint4")
        return (ints.astype(wide) if small else ints).astype(storage.codes_dtype)
    return values.astype(np.float32).astype(storage.codes_dtype)  # FP8 / FP4 codes: exact, values on the grid


def packed_initializers(
    storage: WeightStorage,
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: int | None,
    block_size: int,
    dequantized: np.ndarray,
    spec: Any,
) -> dict[str, np.ndarray]:
    """The MatMulNBits inputs (packed codes, scales, zero points) for learned codes and scales."""
    qw = QuantizedWeight(codes, scale, zero_point.astype(codes.dtype), axis, block_size, dequantized, spec)
    packed = pack_weight(qw, storage.transposed)
    assert not isinstance(packed, str), packed  # quantize packed this very weight
    out = {storage.codes: packed.b, storage.scale: packed.scales}
    if storage.zero_point is not None:
        assert packed.zero_points is not None
        out[storage.zero_point] = packed.zero_points
    return out


def put_folded_bias(
    storage: WeightStorage,
    trained: Callable[[str], np.ndarray],
    inits: dict[str, onnx.TensorProto],
    put: Callable[[str, np.ndarray], None],
) -> None:
    """The trained float bias (``trained(name)``) into the initializer a fused kernel reads it from.

    Written only when training changed it: an untrained export keeps the PTQ bytes.
    """
    if storage.folded_bias is not None and storage.float_bias is not None:
        folded = trained(storage.float_bias).reshape(-1)
        if not np.array_equal(tensor_values(inits[storage.folded_bias]).reshape(-1), folded):
            put(storage.folded_bias, folded)


def put_activation_scales(model: onnx.ModelProto, scales: dict[str, np.ndarray]) -> None:
    """Each static integer activation's scale into its QuantizeLinear and every DequantizeLinear of it.

    A float-pinned Conv/Gemm reading the tensor has a DQ of its own with the scale repeated per
    channel (``quant.emit.shield_float_readers``): it gets the learned scale too.
    """
    inits = {t.name: t for t in model.graph.initializer}
    quantize = {n.name: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input:
            readers.setdefault(node.input[0], []).append(node)
    for name, scale in scales.items():
        q = quantize[f"{name}_QuantizeLinear"]
        value = np.asarray(scale, np.float32).reshape(-1)[0]
        for scale_name in {q.input[1], *(dq.input[1] for dq in readers.get(q.output[0], []))}:
            old = inits[scale_name]
            old.CopyFrom(numpy_helper.from_array(np.full(tuple(old.dims), value, np.float32), scale_name))
