"""Activation fake-quantization as standard ONNX subgraphs, bit-exact with the codecs.

HiF8 (RNA, saturating, NaN/Inf kept) in arithmetic ops, for y = x / s::

    a    = |y|;  e = floor(log2 a)          (Log estimate, corrected exactly against a
                                              Gather from a table of powers of two)
    ulp  = table[e]                         (2^(e - mantissa bits of e's binade); 2^-22 below)
    q    = min(floor(a / ulp + 0.5) * ulp, 2^15) * sign(y)      (a < 2^-23 flushed to 0 first;
                                                                a zero result is +0: no -0)

``a / ulp`` and ``* ulp`` are exact (powers of two) and ``+ 0.5`` cannot round across an integer
(the quotient is in [0.5, 16]), so ``floor(. + 0.5)`` is exactly round-half-away.

MXFP8 (dynamic, 32-element blocks along the last axis): pad, reshape to blocks, amax over the
block (NaN/Inf ignored, as the codec does), X from the exact exponent with the ref rule, elements
``Cast(x * 2^-X -> float8e4m3fn, saturate) * 2^X``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnx

from onnxcomp import ir
from onnxcomp.formats import MXFormat, get_format

_E_OFF = 160  # exponent tables cover e in [-160, 160)
_E_LEN = 320


def _pow2_table(sign: int = 1) -> np.ndarray:
    e = np.arange(-_E_OFF, _E_LEN - _E_OFF, dtype=np.int32)
    with np.errstate(over="ignore"):
        return np.ldexp(np.float32(1), sign * e).astype(np.float32)


def _hif8_ulp_table() -> np.ndarray:
    e = np.arange(-_E_OFF, _E_LEN - _E_OFF)
    m = np.select([np.abs(e) <= 3, np.abs(e) <= 7, np.abs(e) <= 15], [3, 2, 1], default=0)
    ulp_exp = np.where(e >= -22, e - m, -22)  # denormal binades (-22..-16) have m = 0; below: 2^-22
    ulp_exp = np.minimum(ulp_exp, 14)  # above 2^15 everything saturates anyway
    return np.ldexp(np.float32(1), ulp_exp.astype(np.int32)).astype(np.float32)


class _Builder:
    """Small helper: unique names under one prefix, constants, nodes."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix

    def const(self, name: str, value: npt.ArrayLike, dtype: npt.DTypeLike = np.float32) -> ir.Constant:
        return ir.make_constant(ir.unique_name(self.graph, f"{self.prefix}_{name}"), np.asarray(value, dtype))

    def shared(self, name: str, value: np.ndarray) -> ir.Tensor:
        """A table constant shared by every subgraph of the graph (same name, created once)."""
        tensors = self.graph.tensors()
        if name in tensors:
            return tensors[name]
        return ir.make_constant(ir.unique_name(self.graph, name), value)

    def op(self, op: str, inputs: list[ir.Tensor], name: str, attrs: dict | None = None) -> ir.Variable:
        out = ir.make_variable(self.graph, f"{self.prefix}_{name}")
        ir.make_node(self.graph, op, inputs, [out], f"{self.prefix}_{name}", attrs)
        return out

    def reduce_max(self, x: ir.Tensor, name: str, axis: int = -1) -> ir.Variable:
        if ir.default_opset(self.graph) >= 18:
            return self.op("ReduceMax", [x, self.const("axes", [axis], np.int64)], name, {"keepdims": 1})
        return self.op("ReduceMax", [x], name, {"axes": [axis], "keepdims": 1})

    def exponent_index(self, a: ir.Tensor, name: str) -> ir.Variable:
        """Index (e + 160, int64) of floor(log2 a) for a > 0 finite; exact."""
        pow2 = self.shared("onnxcomp_pow2_table", _pow2_table())
        safe = self.op("Max", [a, self.const(f"{name}_floor", np.float32(2.0**-140))], f"{name}_safe")
        log = self.op("Log", [safe], f"{name}_log")
        est = self.op(
            "Floor",
            [self.op("Div", [log, self.const(f"{name}_ln2", np.float32(np.log(2.0)))], f"{name}_log2")],
            f"{name}_est",
        )
        est = self.op(
            "Clip",
            [
                est,
                self.const(f"{name}_lo", np.float32(-_E_OFF + 1)),
                self.const(f"{name}_hi", np.float32(_E_LEN - _E_OFF - 2)),
            ],
            f"{name}_clip",
        )
        idx = self.op(
            "Cast",
            [self.op("Add", [est, self.const(f"{name}_off", np.float32(_E_OFF))], f"{name}_shift")],
            f"{name}_idx0",
            {"to": onnx.TensorProto.INT64},
        )
        p = self.op("Gather", [pow2, idx], f"{name}_p", {"axis": 0})
        p2 = self.op("Mul", [p, self.const(f"{name}_two", np.float32(2.0))], f"{name}_p2")
        below = self.op(
            "Cast", [self.op("Less", [safe, p], f"{name}_below_b")], f"{name}_below", {"to": onnx.TensorProto.INT64}
        )
        above = self.op(
            "Cast",
            [self.op("GreaterOrEqual", [safe, p2], f"{name}_above_b")],
            f"{name}_above",
            {"to": onnx.TensorProto.INT64},
        )
        return self.op("Add", [self.op("Sub", [idx, below], f"{name}_fix1"), above], f"{name}_index")


def hif8_round(b: _Builder, y: ir.Tensor) -> ir.Tensor:
    """HiF8 quantize-dequantize of ``y`` (no scaling), bit-exact with the codec's RNA mode."""
    isnan = b.op("IsNaN", [y], "isnan")
    zero = b.const("zero", np.float32(0.0))
    clean = b.op("Where", [isnan, zero, y], "clean")
    raw = b.op("Abs", [clean], "abs")
    # Below 2^-23 the result is 0 (spec underflow rule); flushing first keeps "+ 0.5" exact,
    # whose quotient is otherwise < 1 there and could round up.
    tiny = b.op("Less", [raw, b.const("underflow", np.float32(2.0**-23))], "underflows")
    a = b.op("Where", [tiny, zero, raw], "abs_flushed")
    idx = b.exponent_index(a, "e")
    ulp = b.op("Gather", [b.shared("onnxcomp_hif8_ulp_table", _hif8_ulp_table()), idx], "ulp", {"axis": 0})
    t = b.op("Add", [b.op("Div", [a, ulp], "div_ulp"), b.const("half", np.float32(0.5))], "plus_half")
    q = b.op("Mul", [b.op("Floor", [t], "floor"), ulp], "rounded")
    q = b.op("Min", [q, b.const("max", np.float32(2.0**15))], "saturated")
    # HiF8 has no -0: a zero result is +0 (a Where, because ORT folds "x + 0" away).
    signed_raw = b.op("Mul", [q, b.op("Sign", [clean], "sign")], "signed_raw")
    signed = b.op("Where", [b.op("Equal", [q, zero], "is_zero"), zero, signed_raw], "signed")
    inf = b.op("IsInf", [clean], "isinf")
    keep_inf = b.op("Where", [inf, clean, signed], "keep_inf")
    return b.op("Where", [isnan, y, keep_inf], "out")


def emit_hif8_activation(graph: ir.Graph, x: ir.Tensor, scale: float | None, name: str, axis: int = -1) -> ir.Tensor:
    """x' = s * HiF8(x / s): static per-tensor ``scale``, or per-token (None: s = max|x| / 16
    over ``axis``, the reduction axis: the last for MatMul/Gemm, channels for Conv)."""
    b = _Builder(graph, name)
    if scale is None:
        amax = b.reduce_max(b.op("Abs", [x], "x_abs"), "amax", axis)
        s = b.op(
            "Max",
            [
                b.op("Div", [amax, b.const("target", np.float32(16.0))], "raw_scale"),
                b.const("tiny", np.float32(np.finfo(np.float32).tiny)),
            ],
            "scale",
        )
    else:
        s = b.const("scale", np.float32(scale))
    y = b.op("Div", [x, s], "scaled")
    return b.op("Mul", [hif8_round(b, y), s], "dequantized")


def emit_cast_activation(graph: ir.Graph, x: ir.Tensor, scale: float, fmt_name: str, name: str) -> ir.Tensor:
    """x' = s * Cast(Cast(x / s -> FP8, saturate) -> float): static FP8 fake-quant, exact.

    Used instead of QuantizeLinear/DequantizeLinear for FP8 activations: onnxruntime 1.32's QDQ
    propagation and Relu+Q fusion corrupt FP8 Q/DQ chains at ORT_ENABLE_EXTENDED (it drops a Relu
    before an FP8 Q), and ORT never fuses FP8 x FP8 compute, so nothing is lost.
    """
    fmt = get_format(fmt_name)
    b = _Builder(graph, name)
    s = b.const("scale", np.float32(scale))
    code = b.op("Cast", [b.op("Div", [x, s], "scaled")], "codes", {"to": fmt.onnx_dtype, "saturate": 1})
    return b.op("Mul", [b.op("Cast", [code], "values", {"to": onnx.TensorProto.FLOAT}), s], "dequantized")


def emit_mx_activation(
    graph: ir.Graph, x: ir.Tensor, k: int, fmt_name: str, name: str, axis: int = -1, rank: int = 0
) -> ir.Tensor:
    """Dynamic MX fake-quant over 32-blocks of ``axis`` (length ``k``, static; the reduction axis).

    A non-last axis (channels of a Conv input, of rank ``rank``) is moved last by a Transpose
    and back afterwards.
    """
    if axis not in (-1, rank - 1):
        perm = [d for d in range(rank) if d != axis] + [axis]
        inverse = [perm.index(d) for d in range(rank)]
        moved = _Builder(graph, name).op("Transpose", [x], "to_last", {"perm": perm})
        out = emit_mx_activation(graph, moved, k, fmt_name, name)
        return _Builder(graph, name).op("Transpose", [out], "from_last", {"perm": inverse})
    fmt = get_format(fmt_name)
    if not isinstance(fmt, MXFormat):
        raise ValueError(f"{fmt_name} activations are not supported")
    elem = fmt.element
    b = _Builder(graph, name)
    block = fmt.block_size
    padded = -(-k // block) * block
    src = x
    if padded != k:
        pads = b.const("pads", [0, padded - k], np.int64)
        axes = b.const("pad_axes", [-1], np.int64)
        src = b.op("Pad", [x, pads, b.const("pad_value", np.float32(0.0)), axes], "padded")
    shape = b.op("Shape", [src], "shape")
    head = b.op("Slice", [shape, b.const("s0", [0], np.int64), b.const("s1", [-1], np.int64)], "head")
    blocked_shape = b.op(
        "Concat", [head, b.const("tail", [padded // block, block], np.int64)], "blocked_shape", {"axis": 0}
    )
    xb = b.op("Reshape", [src, blocked_shape], "blocks")
    absx = b.op("Abs", [xb], "abs")
    finite = b.op(
        "Not", [b.op("Or", [b.op("IsNaN", [xb], "isnan"), b.op("IsInf", [xb], "isinf")], "nonfinite")], "finite"
    )
    absx = b.op("Where", [finite, absx, b.const("zero", np.float32(0.0))], "abs_finite")
    amax = b.reduce_max(absx, "amax")
    idx = b.exponent_index(amax, "e")
    pow2 = b.shared("onnxcomp_pow2_table", _pow2_table())
    p = b.op("Gather", [pow2, idx], "p", {"axis": 0})
    bump = b.op(
        "Cast",
        [b.op("Greater", [amax, b.op("Mul", [p, b.const("r175", np.float32(1.75))], "p175")], "bump_b")],
        "bump",
        {"to": onnx.TensorProto.INT64},
    )
    e = b.op("Add", [idx, bump], "e_ref")
    cap = fmt._max_exponent  # noqa: SLF001 - the codec's float32 overflow cap
    x_idx = b.op(
        "Clip",
        [
            b.op("Sub", [e, b.const("emax", fmt.emax_elem, np.int64)], "x_raw"),
            b.const("xmin", -127 + _E_OFF, np.int64),
            b.const("xmax", cap + _E_OFF, np.int64),
        ],
        "x_clip",
    )
    is_zero = b.op("Equal", [amax, b.const("z", np.float32(0.0))], "is_zero")
    x_idx = b.op("Where", [is_zero, b.const("xzero", -127 + _E_OFF, np.int64), x_idx], "x_idx")
    inv = b.op("Gather", [b.shared("onnxcomp_inv_pow2_table", _pow2_table(-1)), x_idx], "inv_scale", {"axis": 0})
    scale = b.op("Gather", [pow2, x_idx], "scale", {"axis": 0})
    scaled = b.op("Mul", [xb, inv], "scaled")
    if elem.onnx_dtype is not None and elem.name.startswith("fp8"):
        code = b.op("Cast", [scaled], "codes", {"to": elem.onnx_dtype, "saturate": 1})
        vals = b.op("Cast", [code], "values", {"to": onnx.TensorProto.FLOAT})
    else:
        raise ValueError(f"{fmt_name} activations are not supported")
    deq = b.op("Mul", [vals, scale], "deq_blocks")
    flat = b.op("Reshape", [deq, shape], "deq_padded")
    if padded == k:
        return flat
    return b.op(
        "Slice",
        [flat, b.const("k0", [0], np.int64), b.const("k1", [k], np.int64), b.const("kax", [-1], np.int64)],
        "dequantized",
    )
