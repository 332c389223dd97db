"""Float-format weights written so that onnxruntime decodes them once, at session load.

onnxruntime's CPU provider has no FP8 compute, so an FP8 / MXFP8 weight is decoded to float32
before its Conv/MatMul/Gemm runs. Written as ``DequantizeLinear`` (the standard Q/DQ form, what
TensorRT-style runtimes read), ORT never constant-folds it: the weight is decoded at every run and
a Conv fed by a run-time tensor cannot pre-pack its filter for the NCHWc kernels (2.5x the fp32
latency on the demo, with no activation quantization at all). The ``cast`` form computes the same
float32 products from the same stored codes with ops ORT *does* fold at load::

    per tensor / channel:  Cast(float8 codes -> float) * scale        (scale shaped to broadcast)
    blocks (MX, groups):   Cast(float8 codes -> float) * Gather(scale, k // block, axis=k's axis)

so the optimized graph holds a constant float32 weight (pre-packed like the fp32 model's) and the
file keeps its 8-bit codes and per-block scales. Bit-exact with DequantizeLinear: both compute
``float(code) * scale`` in float32 (zero points of float8 are 0). ``float_weight_format = "dq"``
keeps the DequantizeLinear form for other runtimes and for quantization-aware training's export.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.quant.qweight import QuantizedWeight

#: ``quantize`` option ``float_weight_format``: cast (folded by onnxruntime at load) or dq
FLOAT_WEIGHT_FORMATS = ("cast", "dq")

#: Storage dtypes of codes a Cast decodes exactly (every code is a float32 value).
_CAST_CODES = frozenset({"float8_e4m3fn", "float8_e5m2"})


def folds_at_load(qw: QuantizedWeight) -> bool:
    """Whether ``qw`` has a ``cast`` form: float8 codes stored for DequantizeLinear, zero point 0."""
    zero = qw.zero_point
    return (
        qw.storage == "dq"
        and qw.codes.dtype.name in _CAST_CODES
        and zero is not None
        and not np.asarray(zero, np.float32).any()
    )


def emit_cast_weight(graph: ir.Graph, weight: ir.Tensor, qw: QuantizedWeight) -> ir.Tensor:
    """``Cast(codes) * scale`` (blocks: the scale expanded by a Gather); returns the decoded weight."""
    assert folds_at_load(qw), f"weight {weight.name!r}: storage {qw.storage!r} / {qw.codes.dtype} has no cast form"
    base = weight.name
    rank = qw.dequantized.ndim
    codes = ir.make_constant(ir.unique_name(graph, f"{base}_quantized"), qw.codes)
    values = ir.make_variable(graph, f"{base}_values", dtype=np.float32, shape=list(qw.codes.shape))
    ir.make_node(graph, "Cast", [codes], [values], f"{base}_Cast", {"to": onnx.TensorProto.FLOAT})
    scale = np.asarray(qw.scale, np.float32)
    factor: ir.Tensor
    if qw.block_size:
        assert qw.axis is not None
        axis = qw.axis % rank
        length = int(qw.codes.shape[axis])
        stored = ir.make_constant(ir.unique_name(graph, f"{base}_scale"), scale)
        factor = ir.make_variable(graph, f"{base}_scale_expanded", dtype=np.float32)
        index = _block_index(graph, length, qw.block_size)
        ir.make_node(graph, "Gather", [stored, index], [factor], f"{base}_scale_Gather", {"axis": axis})
    else:
        if scale.size > 1:  # one scale per channel of qw.axis: shaped to broadcast against the weight
            assert qw.axis is not None
            shape = [1] * rank
            shape[qw.axis % rank] = scale.size
            scale = scale.reshape(shape)
        else:
            scale = scale.reshape(())
        factor = ir.make_constant(ir.unique_name(graph, f"{base}_scale"), scale)
    out = ir.make_variable(graph, f"{base}_dequantized", dtype=np.float32, shape=list(qw.dequantized.shape))
    ir.make_node(graph, "Mul", [values, factor], [out], f"{base}_Mul")
    return out


def _block_index(graph: ir.Graph, length: int, block: int) -> ir.Tensor:
    """``k // block`` for k < length (int32), one constant per (length, block) in the graph."""
    name = f"onnxcomp_block_index_{length}_{block}"
    cache: dict[str, ir.Tensor] = graph.__dict__.setdefault("_onnxcomp_block_index", {})
    if name not in cache:
        tensors = graph.tensors()
        cache[name] = (
            tensors[name]
            if name in tensors
            else ir.make_constant(ir.unique_name(graph, name), (np.arange(length) // block).astype(np.int32))
        )
    return cache[name]
