"""Writing quantization into the graph (rules from ``docs/onnxruntime.md``).

* weights: quantized initializer + explicit zero point + DequantizeLinear (never a Q on a
  constant); a weight shared by several nodes is written once;
* static activations: one QuantizeLinear/DequantizeLinear pair per tensor, read by every
  consumer (ORT duplicates DQs per node unit when it fuses);
* int32 bias when a Conv/Gemm is fully INT8 (scale = s_x * s_w, zero point 0);
* dynamic per-token activations: ReduceMax(|x|) over the last axis -> scale -> fake-quant in
  plain ops (runs everywhere; ORT does not fuse it);
* a float Conv/Gemm reading a quantized tensor, or a 16-bit one whose bias ORT would overflow,
  reads its own per-axis copy of the DQ (:func:`shield_float_readers`, docs/formats.md#int16-and-uint16).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.formats import ElementFormat, Format, IntegerFormat, get_format
from onnxcomp.ir import WeightLayout
from onnxcomp.quant.activation_subgraphs import emit_cast_activation, emit_hif8_activation
from onnxcomp.quant.lowbit import INT_FACTOR
from onnxcomp.quant.qparams import qparams_for_range
from onnxcomp.quant.qweight import QuantizedWeight, storage_array


def emit_dq(
    graph: ir.Graph,
    base: str,
    codes: ir.Tensor | np.ndarray,
    scale: ir.Tensor | np.ndarray,
    zero_point: np.ndarray,
    axis: int | None,
    block_size: int,
    shape: list[int] | None,
) -> ir.Tensor:
    """A DequantizeLinear named after ``base``; arrays become initializers. Returns its output."""
    if isinstance(codes, np.ndarray):
        codes = ir.make_constant(ir.unique_name(graph, f"{base}_quantized"), codes)
    if isinstance(scale, np.ndarray):
        scale = ir.make_constant(ir.unique_name(graph, f"{base}_scale"), scale)
    zero = ir.make_constant(ir.unique_name(graph, f"{base}_zero_point"), zero_point)
    out = ir.make_variable(graph, f"{base}_dequantized", dtype=np.float32, shape=shape)
    attrs: dict[str, int] = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size:
        attrs["block_size"] = block_size
    ir.make_node(graph, "DequantizeLinear", [codes, scale, zero], [out], f"{base}_DequantizeLinear", attrs)
    return out


def _dq_zero_point(qw: QuantizedWeight) -> np.ndarray:
    """The zero point of a weight stored for DequantizeLinear (only the HiF8 ``lut`` storage has none)."""
    assert qw.zero_point is not None, f"storage {qw.storage!r} has no zero point"
    return qw.zero_point


def emit_weight_dq(graph: ir.Graph, weight: ir.Tensor, qw: QuantizedWeight) -> ir.Tensor:
    """codes + scale + zero point initializers and a DequantizeLinear; returns its output."""
    return emit_dq(
        graph, weight.name, qw.codes, qw.scale, _dq_zero_point(qw), qw.axis, qw.block_size, list(qw.dequantized.shape)
    )


def emit_static_activation(
    graph: ir.Graph, tensor: ir.Tensor, fmt_name: str, scale: np.ndarray, zero_point: np.ndarray
) -> None:
    """A static per-tensor activation quantizer on ``tensor``, every reader rewired: Q -> DQ for the
    integer formats, the exact float subgraph for HiF8 / FP8 (onnxruntime has no kernel for them)."""
    if fmt_name != "hif8" and not fmt_name.startswith("fp8"):
        emit_activation_qdq(graph, tensor, fmt_name, scale, zero_point)
        return
    readers = ir.consumers(tensor)
    s = float(np.asarray(scale).reshape(-1)[0])
    if fmt_name == "hif8":
        out = emit_hif8_activation(graph, tensor, s, f"{tensor.name}_hif8")
    else:
        out = emit_cast_activation(graph, tensor, s, fmt_name, f"{tensor.name}_{fmt_name}")
    for node in readers:
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = out


def emit_activation_qdq(
    graph: ir.Graph, tensor: ir.Tensor, fmt_name: str, scale: np.ndarray, zero_point: np.ndarray
) -> ir.Tensor:
    """QuantizeLinear -> DequantizeLinear on ``tensor``; every consumer is rewired to the DQ.

    A graph output produced by a node keeps its name and becomes the DQ's output: its producer
    writes a new tensor that the Q reads, so nothing but the Q reads the producer (what onnxruntime's
    fusions need).
    """
    fmt = get_format(fmt_name)
    base = tensor.name
    producer = ir.producer(tensor)
    if producer is not None and ir.is_graph_output(graph, tensor):
        inner = ir.make_variable(graph, f"{base}_float", dtype=np.float32, shape=tensor.shape)
        producer.outputs[list(producer.outputs).index(tensor)] = inner
        s, z = _qparams_constants(graph, base, fmt, scale, zero_point)
        q = ir.make_variable(graph, f"{base}_quantized")
        ir.make_node(graph, "QuantizeLinear", [inner, s, z], [q], f"{base}_QuantizeLinear")
        ir.make_node(graph, "DequantizeLinear", [q, s, z], [tensor], f"{base}_DequantizeLinear")
        return tensor
    readers = [n for n in ir.consumers(tensor)]
    s, z = _qparams_constants(graph, base, fmt, scale, zero_point)
    q = ir.make_variable(graph, f"{base}_quantized")
    dq = ir.make_variable(graph, f"{base}_dequantized", dtype=np.float32, shape=tensor.shape)
    ir.make_node(graph, "QuantizeLinear", [tensor, s, z], [q], f"{base}_QuantizeLinear")
    ir.make_node(graph, "DequantizeLinear", [q, s, z], [dq], f"{base}_DequantizeLinear")
    for node in readers:
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = dq
    return dq


def _qparams_constants(
    graph: ir.Graph, base: str, fmt: Format, scale: np.ndarray, zero_point: np.ndarray
) -> tuple[ir.Tensor, ir.Tensor]:
    s = ir.make_constant(ir.unique_name(graph, f"{base}_scale"), np.asarray(scale, np.float32).reshape(()))
    z = ir.make_constant(
        ir.unique_name(graph, f"{base}_zero_point"), storage_array(np.asarray(zero_point).reshape(()), fmt)
    )
    return s, z


def emit_bias_int32(
    graph: ir.Graph, node: ir.Node, index: int, bias: np.ndarray, x_scale: float, w_scale: np.ndarray
) -> None:
    """Replace a float bias by int32 codes (scale s_x * s_w, zero point 0) + DequantizeLinear."""
    scale = (np.float32(x_scale) * np.asarray(w_scale, np.float32)).astype(np.float32)
    per_channel = scale.ndim == 1 and scale.size > 1
    q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    q = np.clip(q, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
    base = node.inputs[index].name
    codes = ir.make_constant(ir.unique_name(graph, f"{base}_quantized"), q)
    s = ir.make_constant(ir.unique_name(graph, f"{base}_scale"), scale if per_channel else scale.reshape(()))
    z = ir.make_constant(
        ir.unique_name(graph, f"{base}_zero_point"), np.zeros(scale.shape if per_channel else (), np.int32)
    )
    out = ir.make_variable(graph, f"{base}_dequantized", dtype=np.float32, shape=list(bias.shape))
    ir.make_node(
        graph, "DequantizeLinear", [codes, s, z], [out], f"{base}_DequantizeLinear", {"axis": 0} if per_channel else {}
    )
    node.inputs[index] = out


def emit_dynamic_per_token(graph: ir.Graph, node: ir.Node, index: int, fmt_name: str, axis: int = -1) -> None:
    """Per-token fake quantization computed at run time: one scale per vector along ``axis``
    (the reduction axis: the last for MatMul/Gemm rows, channels for each Conv pixel).

    int formats (symmetric): s = max(|x|) / qmax, q = Clip(Round(x / s)), x' = q * s.
    float formats: s = max(|x|) / max_value, x' = Cast(Cast(x / s -> format) -> float) * s
    (FP8 only; other formats have their own emitters).
    """
    fmt = get_format(fmt_name)
    x = node.inputs[index]
    base = f"{x.name}_{node.name}_pertoken"
    opset = ir.default_opset(graph)

    def var(suffix: str) -> ir.Variable:
        return ir.make_variable(graph, f"{base}_{suffix}")

    def const(suffix: str, value: np.ndarray) -> ir.Constant:
        return ir.make_constant(ir.unique_name(graph, f"{base}_{suffix}"), value)

    absx, amax, scale, safe = var("abs"), var("amax"), var("scale"), var("safe_scale")
    ir.make_node(graph, "Abs", [x], [absx], f"{base}_Abs")
    if opset >= 18:
        ir.make_node(
            graph,
            "ReduceMax",
            [absx, const("axes", np.array([axis], np.int64))],
            [amax],
            f"{base}_ReduceMax",
            {"keepdims": 1},
        )
    else:
        ir.make_node(graph, "ReduceMax", [absx], [amax], f"{base}_ReduceMax", {"axes": [axis], "keepdims": 1})
    if isinstance(fmt, IntegerFormat):
        top = float(fmt.qmax)
    elif isinstance(fmt, ElementFormat):
        top = float(fmt.max_value)
    else:
        raise ValueError(f"per-token emission of {fmt_name} is done by the low-bit emitters")
    ir.make_node(graph, "Div", [amax, const("qmax", np.array(top, np.float32))], [scale], f"{base}_Div_scale")
    tiny = np.array(np.finfo(np.float32).tiny, np.float32)
    ir.make_node(graph, "Max", [scale, const("tiny", tiny)], [safe], f"{base}_Max")
    scaled, rounded, out = var("scaled"), var("rounded"), var("dequantized")
    ir.make_node(graph, "Div", [x, safe], [scaled], f"{base}_Div")
    if isinstance(fmt, IntegerFormat):
        clipped = var("clipped")
        ir.make_node(graph, "Round", [scaled], [rounded], f"{base}_Round")
        lo, hi = const("qmin", np.array(fmt.qmin, np.float32)), const("qmax_clip", np.array(fmt.qmax, np.float32))
        ir.make_node(graph, "Clip", [rounded, lo, hi], [clipped], f"{base}_Clip")
        ir.make_node(graph, "Mul", [clipped, safe], [out], f"{base}_Mul")
    else:
        import onnx

        code = var("codes")
        ir.make_node(graph, "Cast", [scaled], [code], f"{base}_Cast_to", {"to": fmt.onnx_dtype, "saturate": 1})
        ir.make_node(graph, "Cast", [code], [rounded], f"{base}_Cast_back", {"to": onnx.TensorProto.FLOAT})
        ir.make_node(graph, "Mul", [rounded, safe], [out], f"{base}_Mul")
    node.inputs[index] = out


def activation_qparams(fmt_name: str, lo: float, hi: float, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor activation scale and zero point from a calibrated range."""
    fmt = get_format(fmt_name)
    assert isinstance(fmt, (IntegerFormat, ElementFormat))
    return qparams_for_range(fmt, np.float64(lo), np.float64(hi), symmetric)


def emit_lut_weight(
    graph: ir.Graph, weight: ir.Tensor, qw: QuantizedWeight, fmt: ElementFormat, layout: WeightLayout
) -> ir.Tensor:
    """HiF8 weights: uint8 codes -> Cast(int32) -> Gather(256-entry table) -> Mul(scale)."""
    base = weight.name
    codes = ir.make_constant(ir.unique_name(graph, f"{base}_quantized"), np.asarray(qw.codes, np.uint8))
    table = ir.make_constant(
        ir.unique_name(graph, f"{fmt.name}_decode_table"), np.asarray(fmt.decode_table, np.float32)
    )
    scale = np.asarray(qw.scale, np.float32)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * qw.dequantized.ndim
        shape[layout.channel_axis] = scale.size
        scale = scale.reshape(shape)
    s = ir.make_constant(ir.unique_name(graph, f"{base}_scale"), scale.reshape(scale.shape if scale.size > 1 else ()))
    idx, vals = ir.make_variable(graph, f"{base}_index"), ir.make_variable(graph, f"{base}_values")
    out = ir.make_variable(graph, f"{base}_dequantized", dtype=np.float32, shape=list(qw.dequantized.shape))
    ir.make_node(graph, "Cast", [codes], [idx], f"{base}_Cast", {"to": onnx.TensorProto.INT32})
    ir.make_node(graph, "Gather", [table, idx], [vals], f"{base}_Gather", {"axis": 0})
    ir.make_node(graph, "Mul", [vals, s], [out], f"{base}_Mul")
    return out


def emit_lut_dq_weight(graph: ir.Graph, weight: ir.Tensor, qw: QuantizedWeight, fmt: ElementFormat) -> ir.Tensor:
    """E2M1 in real 4-bit storage: uint4 codes -> Cast -> Gather(int8 table of 2*v) -> DequantizeLinear."""
    base = weight.name
    factor = INT_FACTOR[fmt.name]
    table_values = np.rint(fmt.decode_table.astype(np.float64) * factor)
    table = ir.make_constant(
        ir.unique_name(graph, f"{fmt.name}_int_table"), np.nan_to_num(table_values).astype(np.int8)
    )
    codes = ir.make_constant(ir.unique_name(graph, f"{base}_quantized"), qw.codes)
    idx, ints = ir.make_variable(graph, f"{base}_index"), ir.make_variable(graph, f"{base}_int_codes")
    ir.make_node(graph, "Cast", [codes], [idx], f"{base}_Cast", {"to": onnx.TensorProto.INT32})
    ir.make_node(graph, "Gather", [table, idx], [ints], f"{base}_Gather", {"axis": 0})
    return emit_dq(graph, base, ints, qw.scale, _dq_zero_point(qw), qw.axis, qw.block_size, list(qw.dequantized.shape))


def emit_two_level_weight(graph: ir.Graph, weight: ir.Tensor, qw: QuantizedWeight, layout: WeightLayout) -> ir.Tensor:
    """DQ(FP8 group-scale codes, per-channel scale) -> blocked DQ(element int codes)."""
    base = weight.name
    assert qw.group_scale_codes is not None, "two-level weights carry group-scale codes (quantize_two_level)"
    gscale = emit_dq(
        graph,
        f"{base}_group_scale",
        qw.group_scale_codes,
        qw.scale,
        np.zeros(qw.scale.shape, ml_dtypes.float8_e4m3fn),
        layout.channel_axis,
        0,
        None,
    )
    return emit_dq(
        graph, base, qw.codes, gscale, _dq_zero_point(qw), qw.axis, qw.block_size, list(qw.dequantized.shape)
    )


#: Largest code of the int32 bias onnxruntime writes itself (``Cast(Round(b / (s_x s_w)))``).
_INT32_MAX = float(2**31 - 1)


def shield_float_readers(graph: ir.Graph) -> list[str]:
    """Give each Conv/ConvTranspose/Gemm that onnxruntime would re-quantize an input DQ it leaves alone.

    onnxruntime's ``WeightBiasQuantization`` (ORT_ENABLE_BASIC and above) rewrites every such node
    whose input comes from a per-tensor DequantizeLinear: a float32 weight initializer becomes
    int8 per-tensor Q/DQ, and a float 1-D bias becomes ``Cast(Round(b / (s_x s_w)))`` to int32.
    That silently quantizes a node pinned to float (its input being a quantized activation), and
    the int32 cast overflows with 16-bit scales (W16A16: s_x s_w is 2^16 times an 8-bit one). The
    transformer matches only a scalar input scale, so such a node reads a copy of the DQ with the
    same scale repeated per input channel: numerically identical, left as written. Returns the
    names of the shielded nodes.
    """
    shielded = []
    for node in list(ir.iter_nodes(graph, ("Conv", "ConvTranspose", "Gemm"))):
        dq = ir.producer(node.inputs[0]) if node.inputs and len(node.inputs) > 1 else None
        if dq is None or dq.op != "DequantizeLinear" or len(dq.inputs) < 3:
            continue
        x_scale, x_zero = ir.constant_value(dq.inputs[1]), ir.constant_value(dq.inputs[2])
        if x_scale is None or x_zero is None or x_scale.size != 1 or not _requantized_by_ort(node, float(x_scale)):
            continue
        found = _input_channels(node)
        if found is None:
            continue
        channels, axis = found
        base = f"{node.inputs[0].name}_{node.name}"
        scale = ir.make_constant(ir.unique_name(graph, f"{base}_scale"), np.full(channels, x_scale, np.float32))
        zero = ir.make_constant(ir.unique_name(graph, f"{base}_zero_point"), np.full(channels, x_zero, x_zero.dtype))
        out = ir.make_variable(graph, f"{base}_dequantized", dtype=np.float32, shape=node.inputs[0].shape)
        ir.make_node(
            graph, "DequantizeLinear", [dq.inputs[0], scale, zero], [out], f"{base}_DequantizeLinear", {"axis": axis}
        )
        node.inputs[0] = out
        shielded.append(node.name)
    return shielded


def _requantized_by_ort(node: ir.Node, x_scale: float) -> bool:
    """Whether WeightBiasQuantization would change what ``node`` computes: a float weight it would
    quantize, or a float bias whose int32 codes would overflow (or that cannot be checked)."""
    weight = node.inputs[1]
    value = ir.constant_value(weight)
    if value is not None:
        return value.dtype == np.float32
    wdq = ir.producer(weight)
    if wdq is None or wdq.op != "DequantizeLinear" or len(node.inputs) < 3 or not node.inputs[2].name:
        return False
    bias = ir.constant_value(node.inputs[2])
    if bias is None or bias.ndim != 1 or bias.dtype != np.float32:
        return False
    w_scale = ir.constant_value(wdq.inputs[1])
    if w_scale is None:
        return True
    w_scale = np.asarray(w_scale, np.float64).reshape(-1)
    if w_scale.size not in (1, bias.size):
        return False  # a blocked or mismatched weight scale: the transformer skips the node
    with np.errstate(divide="ignore", over="ignore"):
        codes = np.abs(bias.astype(np.float64)) / (x_scale * w_scale)
    return bool((codes >= _INT32_MAX).any())


def _input_channels(node: ir.Node) -> tuple[int, int] | None:
    """(length, axis) of an input axis longer than 1 (a length-1 axis would be a scalar scale to
    onnxruntime): the channel axis, from the weight's shape, else a static axis of the input."""
    weight = node.inputs[1]
    value = ir.constant_value(weight)
    if value is None:
        wdq = ir.producer(weight)
        value = ir.constant_value(wdq.inputs[0]) if wdq is not None and wdq.inputs else None
    if value is not None and value.ndim >= 2:
        shape = value.shape
        if node.op == "Conv":
            found = int(shape[1]) * int(node.attrs.get("group", 1)), 1
        elif node.op == "ConvTranspose":
            found = int(shape[0]), 1
        else:
            found = int(shape[1] if node.attrs.get("transB", 0) else shape[0]), 0 if node.attrs.get("transA", 0) else 1
        if found[0] > 1:
            return found
    dims = node.inputs[0].shape or []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int) and dim > 1:
            return dim, axis
    return None
