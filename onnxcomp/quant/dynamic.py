"""Dynamic per-tensor INT8 activations written the way onnxruntime fuses them.

``quantize_dynamic``'s pattern, which onnxruntime's CPU provider turns into
``DynamicQuantizeMatMul`` (MatMul, Gemm) or runs as ``ConvInteger`` (Conv)
(``docs/onnxruntime.md#fused-patterns``)::

    x -> DynamicQuantizeLinear -> (x_q uint8, x_scale, x_zero_point)
    MatMulInteger(x_q, W_q, x_zero_point, W_zero_point) | ConvInteger(...)  -> int32
    Cast(float) * (x_scale * W_scale)  [+ bias]

One scale per activation tensor is computed at run time (uint8, asymmetric, onnxruntime's rule),
so it needs no calibration; the weights are the offline int8 codes with their per-channel (or
per-tensor) scales. Per-token activations (``granularity = "token"``) are more accurate but have
no fused kernel.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.formats.nbits import transposed
from onnxcomp.quant.qweight import QuantizedWeight


def emit_dynamic_fake_quant(graph: ir.Graph, x: ir.Tensor, base: str) -> ir.Tensor:
    """``DequantizeLinear(DynamicQuantizeLinear(x))``: what the fused pattern computes, in float."""
    var = ir.make_variable
    xq, xs, xz = var(graph, f"{base}_u8"), var(graph, f"{base}_scale"), var(graph, f"{base}_zero_point")
    out = var(graph, f"{base}_dynamic_fake_quant", dtype=np.float32, shape=x.shape)
    ir.make_node(graph, "DynamicQuantizeLinear", [x], [xq, xs, xz], f"{base}_DynamicQuantizeLinear")
    ir.make_node(graph, "DequantizeLinear", [xq, xs, xz], [out], f"{base}_DequantizeLinear")
    return out


def _decline(node: ir.Node, qw: QuantizedWeight) -> str | None:
    """Why ``node`` has no fused dynamic per-tensor form, or None."""
    if qw.storage != "dq" or qw.codes.dtype.name not in ("int8", "uint8") or qw.zero_point is None:
        return "dynamic per-tensor activations need int8/uint8 weights"
    if qw.block_size:
        return "dynamic per-tensor activations need per-tensor or per-channel weights, not groups"
    a = node.attrs
    if node.op == "Gemm" and (
        a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0
    ):
        return "Gemm with transA or alpha/beta != 1 has no MatMulInteger form"
    if node.op == "Conv" and qw.zero_point.size > 1 and np.any(qw.zero_point):
        return "ConvInteger takes one weight zero point; use symmetric weights"
    if node.op not in ("Conv", "MatMul", "Gemm"):
        return f"{node.op} has no integer dynamic kernel"
    return None


def emit_dynamic_tensor(graph: ir.Graph, node: ir.Node, qw: QuantizedWeight) -> ir.Node | str:
    """Rewrite ``node`` with dynamic per-tensor activations: the integer compute node, or why it cannot be."""
    reason = _decline(node, qw)
    if reason is not None:
        return reason
    assert qw.zero_point is not None  # _decline checked it
    bias: np.ndarray | None = None
    if node.op in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2].name:
        bias = ir.constant_value(node.inputs[2])
        if bias is None:
            return f"the {node.op} bias is not a constant"
    base = node.name or node.outputs[0].name
    const, var = ir.make_constant, ir.make_variable
    x = node.inputs[0]
    xq, xs, xz = var(graph, f"{x.name}_dq_u8"), var(graph, f"{x.name}_dq_scale"), var(graph, f"{x.name}_dq_zero_point")
    ir.make_node(graph, "DynamicQuantizeLinear", [x], [xq, xs, xz], f"{base}_DynamicQuantizeLinear")
    codes, scale, zero = qw.codes, np.asarray(qw.scale, np.float32), np.asarray(qw.zero_point)
    out = node.outputs[0]
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        codes = transposed(codes)
    if node.op == "Conv":
        shape = [1, -1] + [1] * (codes.ndim - 2)
        scale = scale.reshape(shape) if scale.size > 1 else scale.reshape(())
        zero = zero.reshape(-1)[:1].reshape(())  # ConvInteger: one zero point (all zero, checked above)
        bias = None if bias is None else bias.astype(np.float32).reshape(shape)
        kernel, attrs = "ConvInteger", {k: v for k, v in node.attrs.items() if k != "activation"}
    else:
        kernel, attrs = "MatMulInteger", {}
    w = const(ir.unique_name(graph, f"{base}_weight_quantized"), np.ascontiguousarray(codes))
    wz = const(ir.unique_name(graph, f"{base}_weight_zero_point"), np.ascontiguousarray(zero))
    ws = const(ir.unique_name(graph, f"{base}_weight_scale"), np.ascontiguousarray(scale))
    acc, accf, s = var(graph, f"{base}_int32"), var(graph, f"{base}_float"), var(graph, f"{base}_scale")
    ir.make_node(graph, "Mul", [xs, ws], [s], f"{base}_scales_Mul")
    original = node.name
    node.name = ir.unique_name(graph, f"{original}_replaced")
    compute = ir.make_node(graph, kernel, [xq, w, xz, wz], [acc], f"{base}_{kernel}", attrs)
    if original:
        compute.name = original  # onnxruntime keeps it on the fused kernel: the kernel report finds it
    ir.make_node(graph, "Cast", [acc], [accf], f"{base}_Cast", {"to": onnx.TensorProto.FLOAT})
    scaled = out if bias is None else var(graph, f"{base}_scaled")
    ir.make_node(graph, "Mul", [accf, s], [scaled], f"{base}_Mul")
    if bias is not None:
        b = const(ir.unique_name(graph, f"{base}_bias"), bias.astype(np.float32))
        ir.make_node(graph, "Add", [scaled, b], [out], f"{base}_bias_Add")
    node.inputs.clear()
    node.outputs.clear()
    return compute
