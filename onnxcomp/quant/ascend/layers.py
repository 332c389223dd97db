"""What ATC can quantize, and each quantized layer's factors (docs/ascend.md, "What can be quantized").

:func:`constraint_reason` is the pre-check of ATC's layer constraints: a layer failing one stays
float and the reason goes to the report. :func:`make_layer` turns a calibrated range and a float
weight into the factors that both the deploy model and the fake-quant model are written from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcomp import ir
from onnxcomp.formats import IntegerFormat, get_format
from onnxcomp.quant.ascend.packing import deq_scale
from onnxcomp.quant.qweight import QuantizedWeight
from onnxcomp.quant.spec import Granularity, TensorSpec
from onnxcomp.quant.weights import quantize_weight

#: How a layer's weight is rounded on its Ascend grid: (weight, spec, layout, name) -> QuantizedWeight.
WeightQuantizer = Callable[[np.ndarray, TensorSpec, ir.WeightLayout, str], QuantizedWeight]

#: Ops this target quantizes with weights (AveragePool, which has none, behind ``ascend_avgpool``).
ASCEND_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Ops ATC quantizes with INT16 activations.
INT16_OPS = ("Conv", "ConvTranspose", "Gemm")
#: Activation formats of the quantizer's config and the AscendQuant dst_type each maps to.
ACTIVATION_TYPES = {"int8": "INT8", "uint8": "INT8", "int16": "INT16", "uint16": "INT16"}
WEIGHT_TYPES = {"int8": "INT8", "uint8": "INT8", "int4": "INT4", "uint4": "INT4"}
INT32_MAX = 2**31 - 1


@dataclass
class AscendLayer:
    """One quantized layer: the factors the record stores and both models are written from."""

    node: str  # the ONNX node name (the record key)
    op: str
    input: str  # the activation tensor AscendQuant reads
    act_type: str  # "INT8" | "INT16"
    wts_type: str  # "INT8" | "INT4"
    scale_d: np.float32
    offset_d: int
    scale_w: np.ndarray  # float32 (C_out,) per channel, (1,) per tensor
    codes: np.ndarray  # int8 weight codes in the op's layout (unpacked)
    channel_axis: int  # output-channel axis of the weight
    bias: np.ndarray | None  # int32 (C_out,) or None
    s19: bool = False
    balance: np.ndarray | None = None  # smoothing factors folded into this layer (tensor_balance_factor)
    notes: dict[str, Any] = field(default_factory=dict)  # GPTQ / distill / bias correction: the JSON record's
    bias_add: str | None = None  # a MatMul's bias Add, folded into the integer path (AscendDequant after it)

    @property
    def per_channel(self) -> bool:
        return self.scale_w.size > 1

    @property
    def deq(self) -> np.ndarray:
        """float32 deq[c] = scale_d * scale_w[c] (what AscendDequant's UINT64 parameter carries)."""
        return deq_scale(self.scale_d, self.scale_w, self.s19)

    @property
    def quant_scale(self) -> np.float32:
        return quant_scale(self.scale_d)

    @property
    def bits(self) -> int:
        return 16 if self.act_type == "INT16" else 8


def quant_scale(scale_d: float | np.floating) -> np.float32:
    """AscendQuant's ``scale`` attribute: float32(1 / scale_d), from the float32 scale_d the record holds."""
    return np.float32(1.0 / np.float64(np.float32(scale_d)))


def format_reason(dtype: str, role: str) -> str | None:
    """Why a format has no Ascend deploy form, or None (ATC's AscendQuant maps only INT8, INT16, INT4)."""
    table = ACTIVATION_TYPES if role == "activations" else WEIGHT_TYPES
    if dtype in table:
        return None
    return (
        f"{role} format {dtype!r} has no ONNX deploy form for ATC (only INT8/INT16 activations and "
        "INT8/INT4 weights); use --target ort (or --simulation SIM.onnx) for a runnable simulation instead"
    )


def constraint_reason(graph: ir.Graph, node: ir.Node, weight: np.ndarray, act_type: str, wts_type: str) -> str | None:
    """The ATC constraint ``node`` fails, or None (docs/ascend.md, "ATC layer constraints")."""
    op = node.op
    if op not in ASCEND_OPS:
        return f"{op} is not quantized for ATC (only {', '.join(ASCEND_OPS)})"
    if act_type == "INT16" and op not in INT16_OPS:
        return f"ATC takes INT16 activations only for {', '.join(INT16_OPS)}, not {op}"
    if op == "Gemm":
        if int(node.attrs.get("transA", 0)) != 0:
            return "Gemm with transA = 1: ATC quantizes Gemm only with transA = 0"
        if float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
            return "Gemm with alpha or beta != 1 (fold them into the weight and bias first)"
    if op == "MatMul" and weight.ndim != 2:
        return f"MatMul weight of rank {weight.ndim}: ATC needs a 2-D constant second input"
    if op == "ConvTranspose":
        if weight.ndim != 4:
            return f"ConvTranspose with a {weight.ndim}-D filter: ATC needs a 4-D filter"
        if any(int(d) != 1 for d in node.attrs.get("dilations", [1, 1])):
            return "ConvTranspose with dilation != 1: ATC needs dilation 1"
        if int(node.attrs.get("group", 1)) != 1:
            return "grouped ConvTranspose: per-channel deq factors for groups are not written by onnxcomp"
    if op == "Conv" and weight.ndim == 5 and int(node.attrs.get("dilations", [1, 1, 1])[0]) != 1:
        return "3-D Conv with dilation_d != 1: ATC needs dilation_d = 1"
    if wts_type == "INT4":
        axis = _int4_axis(node)
        if weight.shape[axis] % 2:
            return f"INT4 weights need an even input-channel count (C_in = {weight.shape[axis]} is odd)"
    return None


def matmul_bias_add(graph: ir.Graph, node: ir.Node, wts_type: str) -> tuple[ir.Node, np.ndarray] | None:
    """The Add after a MatMul that holds its bias, with the bias (N,), or None.

    It must be the MatMul's only reader (not a graph output) and add a float32 constant of N
    values along the last axis. AMCT then puts the bias into the integer path and the
    AscendDequant after the Add (docs/ascend.md). Not for INT4 weights: AMCT's ``bias_quant``
    Cast would make the Add mix int32 and float.
    """
    if node.op != "MatMul" or wts_type != "INT8":
        return None
    out = node.outputs[0]
    users = ir.consumers(out)
    if len(users) != 1 or users[0].op != "Add" or ir.is_graph_output(graph, out) or len(users[0].inputs) != 2:
        return None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is out:
        return None
    value = ir.constant_value(other)
    weight = ir.constant_value(node.inputs[1])
    if value is None or weight is None or value.dtype != np.float32 or weight.ndim != 2:
        return None
    channels = weight.shape[1]
    if value.size != channels or (value.ndim > 0 and value.shape[-1] != channels):
        return None
    return add, value.reshape(-1)


def _int4_axis(node: ir.Node) -> int:
    if node.op == "Conv":
        return 1
    if node.op == "Gemm":
        return 1 if int(node.attrs.get("transB", 0)) else 0
    return 0


def activation_qparams(act_type: str, lo: float, hi: float, symmetric: bool, name: str) -> tuple[np.float32, int]:
    """(scale_d, offset_d) of a signed INT8/INT16 grid over [lo, hi]: q = round(x / scale_d) + offset_d."""
    fmt = get_format("int16" if act_type == "INT16" else "int8")
    assert isinstance(fmt, IntegerFormat)
    scale, zp = fmt.compute_qparams(lo, hi, symmetric, name=name)
    return np.float32(np.asarray(scale).reshape(())), int(np.asarray(zp).reshape(()))


def weight_spec(op: str, wspec: TensorSpec) -> TensorSpec:
    """The weight spec ATC takes for ``op``: symmetric, per channel for convs, per tensor for Gemm/MatMul."""
    per_channel = op in ("Conv", "ConvTranspose")
    return TensorSpec(
        "int4" if WEIGHT_TYPES[wspec.dtype] == "INT4" else "int8",
        Granularity("channel" if per_channel else "tensor"),
        True,
        wspec.observer if wspec.observer in ("minmax", "mse") else "minmax",
        wspec.observer_options if wspec.observer in ("minmax", "mse") else (),
    )


def layer_layout(node: ir.Node, weight: np.ndarray) -> ir.WeightLayout:
    return ir.weight_layout(node.op, weight.ndim, bool(node.attrs.get("transB", 0)))


def _round_to_nearest(w: np.ndarray, spec: TensorSpec, layout: ir.WeightLayout, name: str) -> QuantizedWeight:
    return quantize_weight(w, spec, layout, name)


def make_layer(
    node: ir.Node,
    weight: np.ndarray,
    bias: np.ndarray | None,
    act: tuple[str, np.float32, int],
    wspec: TensorSpec,
    s19: bool,
    quantizer: WeightQuantizer = _round_to_nearest,
) -> AscendLayer | str:
    """The layer's factors (symmetric weights: per channel for convs, per tensor for Gemm/MatMul), or why not.

    ``quantizer`` chooses the codes (and may choose the scales) on that grid: round to nearest by
    default, GPTQ or a distilled weight from the pipeline; ATC needs offset_w = 0, so a result
    with a non-zero zero point is refused.
    """
    act_type, scale_d, offset_d = act
    wts_type = WEIGHT_TYPES[wspec.dtype]
    layout = layer_layout(node, weight)
    qw = quantizer(weight, weight_spec(node.op, wspec), layout, node.inputs[1].name)
    if qw.zero_point is not None and np.any(np.asarray(qw.zero_point).astype(np.int32) != 0):
        return "the learned weight has a non-zero zero point: ATC needs symmetric weights (offset_w = 0)"
    codes = np.asarray(qw.codes).astype(np.int8)
    scale_w = np.asarray(qw.scale, dtype=np.float32).reshape(-1)
    layer = AscendLayer(
        node.name,
        node.op,
        node.inputs[0].name,
        act_type,
        wts_type,
        scale_d,
        offset_d,
        scale_w,
        codes,
        layout.channel_axis,
        None,
        s19,
    )
    if qw.algorithm is not None:
        layer.notes["weights"] = qw.algorithm
    if bias is not None:
        q = bias_codes(np.asarray(bias, np.float64), layer.deq, weight.shape[layout.channel_axis])
        if isinstance(q, str):
            return q
        layer.bias = q
    return layer


def pool_reason(node: ir.Node, act_type: str) -> str | None:
    """Why an AveragePool is not quantized for ATC, or None (2-D pooling of an NCHW tensor, INT8)."""
    if act_type != "INT8":
        return f"ATC takes INT16 activations only for {', '.join(INT16_OPS)}, not AveragePool"
    if len(node.attrs.get("kernel_shape", [])) != 2:
        return "AveragePool over other than 2 spatial axes: ATC's quantized pooling is 2-D"
    return None


def make_pool_layer(node: ir.Node, act: tuple[str, np.float32, int]) -> AscendLayer:
    """An AveragePool's factors: no weight (scale_w = 1, so deq = scale_d), the mean of the codes dequantized.

    UNVERIFIED (docs/ascend.md): that ATC's integer AveragePool yields the mean of ``x_q - offset_d``.
    """
    act_type, scale_d, offset_d = act
    return AscendLayer(
        node.name,
        node.op,
        node.inputs[0].name,
        act_type,
        "INT8",
        scale_d,
        offset_d,
        np.ones(1, np.float32),
        np.zeros(0, np.int8),
        1,
        None,
    )


def bias_codes(bias: np.ndarray, deq: np.ndarray, channels: int) -> np.ndarray | str:
    """int32 round(bias / deq[c]) per output channel, or why it does not fit (AMCT's overflow error)."""
    q = np.round(np.asarray(bias, np.float64).reshape(-1) / np.broadcast_to(deq.astype(np.float64), (channels,)))
    if np.any(np.abs(q) > INT32_MAX):
        worst = float(np.abs(q).max())
        return f"int32 bias overflow (|bias / deq| reaches {worst:.3g} > 2^31 - 1): add the layer to the skip list"
    return q.astype(np.int32)
