"""Activation fake-quantization as standard ONNX subgraphs, bit-exact with the codecs.

onnxruntime's CPU provider has no FP8 / HiF8 / MX compute, so these subgraphs run element by
element, one full pass over the tensor per node. They are built from few, cheap nodes that keep few
intermediates alive. What decided the design (onnxruntime 1.32, one thread, ns per element on a
4 MB tensor; passes over larger tensors cost up to 2x more): a float pass ~0.28, one with a 1-byte
output (comparisons, QuantizeLinear) ~0.19; ``Log`` 1.4; ``GatherElements`` 0.4 but ``Gather``
3.2 (only the former is used, on flattened views); ``Where`` and ``Sign`` 1.1; an FP8 ``Cast``
~7 each way (none is used for E4M3). Only Clip, Relu, LeakyRelu, HardSigmoid, Cast (same size)
and a few other activations run in place; Abs, Min, Max and the arithmetic ops always allocate, so
|y| is written as ``LeakyRelu(y, alpha=-1)`` and clamps as ``Clip``.

FP8 E4M3 (RNE, saturating at 448, signed zeros kept), static scale s::

    z  = x / (s 2^-k)                    = (x / s) 2^k exactly; k makes 2^(2k - 10) >= s
    a  = clip(|z|, 0, 448 2^k)
    c  = clip(a (2^20 + 1), fl(2^(k-6) (2^20 + 1)), inf)   Veltkamp: c - (c - a) rounds a to 4
    hi = c - (c - a)                                        significant bits (RNE), and below
    x' = hi * clip(z, -s 2^-k, s 2^-k)                      2^(k-6) to the fixed subnormal grid

The last factor is +-s 2^-k wherever the result is not zero and a signed fraction elsewhere, so
x' = +-fl(E4M3(x / s) * s) and zeros keep the sign of x.

HiF8 (RNA, saturating at 2^15, NaN and +-Inf kept, no -0), y = x / s::

    i  = QuantizeLinear(HardSigmoid(log|y|)) -> uint8   = RNE(log2(|y| / sqrt 2)) + 126
    r  = R[i]                                          1 / (grid step of binade i - 126): a table
    q  = floor(min(|y|, 2^15) * r + (1/2)^-) / r       (1/2)^- = nextbelow(0.5)
    x' = q * [s, -s][y <= -2^-23]                      the sign; every zero result is +0

The exponent estimate may be off by one only for |y| within ~1e-6 of a power of two, where the
rounding gives that power of two on either binade's grid (any |y| within 3% would do), so it needs
no exact correction. Bucket 255 (only +-Inf reaches it) has r = FLT_MAX: Inf * r / r stays Inf.
``floor(v + nextbelow(0.5))`` equals ``floor(v + 0.5)`` on the reals for every float v >= 0 and,
unlike it, never rounds the sum up to the next integer (v = 0.5 - 2^-25). A tensor the graph
keeps >= 0 (Relu, MaxPool(Relu), ...) skips the sign; per-token scales (|y| <= 16) skip the clamp.

MXFP8 (dynamic, 32-element blocks along the reduction axis): a Reshape splits the axis into
(blocks, 32) in place (no Transpose; an axis of at most 32 is reduced as is; a partial last block
is a separate Split part instead of zero padding), amax over the finite elements (``Where``),
``2^X`` from ``ceil`` against a power of two (exact), then the E4M3 rounding above on x * 2^-X.

Where they go (``quant.plan``, ``quant.apply``): only at the inputs of quantized nodes, once per
tensor. A static FP8 / HiF8 tensor gets no second subgraph on the node's output (that Q exists for
ORT's integer kernels, which these formats have none of), and a dynamic HiF8 / MX tensor read by
several nodes along the same axis (Q, K and V projections) is emulated once for all of them. The
weights of these nodes are decoded once at session load (``quant.folded_weights``), so what the
emulation costs is these subgraphs alone (bench/README.md, issue 11).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnx

from onnxcomp import ir
from onnxcomp.formats import MXFormat, get_format

_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)
_HALF_DOWN = float(np.nextafter(np.float32(0.5), np.float32(0)))  # floor(v + this) = RNA(v), v >= 0

# HiF8: index i = RNE(log2(|y| / sqrt 2)) + _HIF8_ZP = floor(log2 |y|) + _HIF8_ZP (up to the
# tolerated error near powers of two), saturated to 0..255 by QuantizeLinear; log2 of the largest
# float32 gives 254, so only +-Inf reaches 255. NaN gives 0.
_HIF8_ZP = 126
_HIF8_MAX = 2.0**15
_HIF8_UNDERFLOW = 2.0**-23  # |y| below this rounds to 0

# FP8 E4M3 (and the MX elements)
_E4M3_MAX = 448.0
_E4M3_MIN_NORMAL = 2.0**-6
_E4M3_SPLIT = 2.0**20 + 1  # Veltkamp constant for 24 - 20 = 4 significant bits

# MX block exponents: index = RNE(log2(amax / 1.75)) + _MX_ZP
_MX_ZP = 121


def _hif8_mantissa_bits(e: int) -> int:
    ae = abs(e)
    return 3 if ae <= 3 else 2 if ae <= 7 else 1 if ae <= 15 else 0


def _hif8_reciprocal_step_table() -> np.ndarray:
    """R[i] = 1 / (HiF8 grid step of binade e = i - 126), float32, 256 entries (see module doc)."""
    table = np.empty(256, np.float64)
    for i in range(256):
        e = i - _HIF8_ZP
        if e <= -22:  # 2^-23 <= |y| < 2^-22 rounds to 2^-22 (and below 2^-23 to 0): step 2^-22
            table[i] = 2.0**22
        elif e <= -16:  # denormal binades: only 2^e itself
            table[i] = 2.0**-e
        elif e <= 14:
            table[i] = 2.0 ** (_hif8_mantissa_bits(e) - e)
        else:  # |y| is clamped to 2^15 = 2 * 2^14 first: saturation
            table[i] = 2.0**-14
    table[255] = _F32_MAX  # +-Inf: Inf * r / r = Inf
    return table.astype(np.float32)


def _mx_pow2_table() -> np.ndarray:
    """T[i] = 2^(i - 121), float32, 256 entries (2^-121 .. 2^127; the top entries are unused)."""
    e = np.minimum(np.arange(256) - _MX_ZP, 127)
    return np.ldexp(np.float32(1), e.astype(np.int32)).astype(np.float32)


class _Builder:
    """Small helper: unique names under one prefix, constants, nodes."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix

    def const(self, name: str, value: npt.ArrayLike, dtype: npt.DTypeLike = np.float32) -> ir.Constant:
        return ir.make_constant(ir.unique_name(self.graph, f"{self.prefix}_{name}"), np.asarray(value, dtype))

    def shared(self, name: str, value: np.ndarray) -> ir.Tensor:
        """A table constant shared by every subgraph of the graph (same name, created once)."""
        cache: dict[str, ir.Tensor] = self.graph.__dict__.setdefault("_onnxcomp_act_tables", {})
        if name not in cache:
            tensors = self.graph.tensors()
            cache[name] = (
                tensors[name] if name in tensors else ir.make_constant(ir.unique_name(self.graph, name), value)
            )
        return cache[name]

    def op(self, op: str, inputs: list[ir.Tensor], name: str, attrs: dict | None = None) -> ir.Variable:
        out = ir.make_variable(self.graph, f"{self.prefix}_{name}")
        ir.make_node(self.graph, op, inputs, [out], f"{self.prefix}_{name}", attrs)
        return out

    def reduce_max(self, x: ir.Tensor, name: str, axis: int = -1) -> ir.Variable:
        return self.reduce("ReduceMax", x, name, axis)

    def reduce(self, op: str, x: ir.Tensor, name: str, axis: int = -1) -> ir.Variable:
        """ReduceMax / ReduceMin over one axis, keeping it (axes an input from opset 18)."""
        if ir.default_opset(self.graph) >= 18:
            return self.op(op, [x, self.const("axes", [axis], np.int64)], name, {"keepdims": 1})
        return self.op(op, [x], name, {"axes": [axis], "keepdims": 1})

    def lookup(self, table: ir.Tensor, index: ir.Tensor, like: ir.Tensor, name: str) -> ir.Variable:
        """``table[index]`` elementwise, shaped like ``like``: GatherElements on flattened views.

        (Gather does the same but costs ~8x more per element in onnxruntime's CPU provider.)
        """
        flat = self.op("Reshape", [index, self.const("flat", [-1], np.int64)], f"{name}_flat_index")
        values = self.op("GatherElements", [table, flat], f"{name}_flat", {"axis": 0})
        return self.op("Reshape", [values, self.op("Shape", [like], f"{name}_shape")], name)


def _hif8_magnitude(b: _Builder, a: ir.Tensor, saturate: bool = True) -> ir.Variable:
    """HiF8(a) for a = |y| >= 0 (NaN and +Inf kept): see the module docstring.

    ``saturate=False`` leaves out the clamp at 2^15 (and so the +Inf case): for a <= 2^15 only.
    """
    log = b.op("Log", [a], "log")
    # HardSigmoid (computed in place) folds the -1/2 binade shift into an affine map of the log:
    # h = (log2(a / sqrt 2) + 126) / 512, so RNE(h / (1/512)) = RNE(log2(a / sqrt 2)) + 126; h is
    # in (0, 1) for every finite a >= 2^-125 (below: 0, index 0), +Inf gives 1 (index 255).
    slope = np.float32(1.0 / (512.0 * np.log(2.0)))
    offset = np.float32((_HIF8_ZP - 0.5) / 512.0)
    shifted = b.op("HardSigmoid", [log], "log2_affine", {"alpha": float(slope), "beta": float(offset)})
    code = b.op(
        "QuantizeLinear",
        [shifted, b.const("step", np.float32(1.0 / 512.0)), b.const("zp", 0, np.uint8)],
        "binade",
    )
    index = b.op("Cast", [code], "binade_i32", {"to": onnx.TensorProto.INT32})
    r = b.lookup(b.shared("onnxcomp_hif8_inv_step", _hif8_reciprocal_step_table()), index, a, "inv_step")
    if saturate:
        a = b.op("Clip", [a, b.const("zero", np.float32(0.0)), b.const("max", np.float32(_HIF8_MAX))], "saturated")
    steps = b.op("Mul", [a, r], "steps")
    n = b.op("Floor", [b.op("Add", [steps, b.const("half", np.float32(_HALF_DOWN))], "plus_half")], "rna")
    return b.op("Div", [n, r], "rounded")


def _hif8_negative(b: _Builder, t: ir.Tensor, threshold: float) -> ir.Variable:
    """Bool mask ``t <= -threshold``: the values whose HiF8 result is negative (a zero result is +0)."""
    below = np.nextafter(np.float32(threshold), np.float32(0))
    return b.op("Less", [t, b.const("neg_threshold", -below)], "negative")


def _signed_factor(b: _Builder, negative: ir.Tensor, magnitude: float) -> ir.Variable:
    """``-magnitude`` where ``negative``, else ``magnitude`` (a two-entry table lookup)."""
    index = b.op("Cast", [negative], "negative_i32", {"to": onnx.TensorProto.INT32})
    table = b.const("sign_table", [magnitude, -magnitude])
    return b.lookup(table, index, negative, "sign")


def _static_hif8_threshold(scale: np.float32) -> float:
    """Smallest float x >= 0 with fl(x / scale) >= 2^-23 (the HiF8 result of x / scale is not 0)."""
    with np.errstate(all="ignore"):
        x = np.float32(np.float64(_HIF8_UNDERFLOW) * np.float64(scale))
        while x > 0 and np.divide(np.nextafter(x, np.float32(0)), scale, dtype=np.float32) >= _HIF8_UNDERFLOW:
            x = np.nextafter(x, np.float32(0))
        while np.divide(x, scale, dtype=np.float32) < _HIF8_UNDERFLOW:
            x = np.nextafter(x, np.float32(np.inf))
    return float(x)


#: ops whose output is never negative (NaN aside), and ops that only move / select / average
#: their first input's values (or, for Concat, every input's)
_NONNEGATIVE_OPS = {"Relu", "Sigmoid", "Softmax", "Abs", "Exp", "HardSigmoid", "Softplus"}
_PASS_THROUGH_OPS = {
    "MaxPool",
    "GlobalMaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMax",
    "ReduceMean",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Slice",
    "Split",
    "Concat",
}


def _never_negative(t: ir.Tensor, depth: int = 12) -> bool:
    """True when the graph guarantees t >= 0 (or NaN) elementwise, e.g. MaxPool(Relu(...)).

    HiF8 has no -0 and gives |t| for such t, so its sign handling can be left out.
    """
    node = ir.producer(t)
    if node is None or depth == 0 or node.domain not in ("", "ai.onnx", None):
        return False
    if node.op in _NONNEGATIVE_OPS:
        return True
    if node.op == "Clip" and len(node.inputs) > 1 and node.inputs[1].name:
        low = ir.constant_value(node.inputs[1])
        return low is not None and low.size == 1 and float(low.reshape(-1)[0]) >= 0
    if node.op in _PASS_THROUGH_OPS:
        data = node.inputs if node.op == "Concat" else node.inputs[:1]
        return all(_never_negative(d, depth - 1) for d in data)
    return False


def emit_hif8_activation(graph: ir.Graph, x: ir.Tensor, scale: float | None, name: str, axis: int = -1) -> ir.Tensor:
    """x' = s * HiF8(x / s): static per-tensor ``scale``, or per-token (None: s = max|x| / 16
    over ``axis``, the reduction axis: the last for MatMul/Gemm, channels for Conv).

    When ``x`` is never negative (``_never_negative``), the sign handling is left out.
    """
    b = _Builder(graph, name)
    signed = not _never_negative(x)
    if scale is None:
        amax = b.reduce_max(b.op("Abs", [x], "x_abs") if signed else x, "amax", axis)
        s: ir.Tensor = b.op(
            "Max",
            [
                b.op("Div", [amax, b.const("target", np.float32(16.0))], "raw_scale"),
                b.const("tiny", np.float32(_F32_TINY)),
            ],
            "scale",
        )
        # |y| = |x| / s <= 16 (a few ulps more, from rounding s): no saturation. A row whose amax
        # is NaN or Inf gives NaN or 0, never Inf.
        y = b.op("Div", [x, s], "scaled")
        if not signed:
            return b.op("Mul", [_hif8_magnitude(b, y, saturate=False), s], "dequantized")
        negative = _hif8_negative(b, y, _HIF8_UNDERFLOW)
        q = _hif8_magnitude(b, _abs_in_place(b, y), saturate=False)
        return b.op("Mul", [b.op("Mul", [q, _signed_factor(b, negative, 1.0)], "signed"), s], "dequantized")
    s32 = np.float32(scale)
    const_s = b.const("scale", s32)
    if not signed:
        return b.op("Mul", [_hif8_magnitude(b, b.op("Div", [x, const_s], "scaled")), const_s], "dequantized")
    negative = _hif8_negative(b, x, _static_hif8_threshold(s32))
    q = _hif8_magnitude(b, _abs_in_place(b, b.op("Div", [x, const_s], "scaled")))
    return b.op("Mul", [q, _signed_factor(b, negative, float(s32))], "dequantized")


def _abs_in_place(b: _Builder, y: ir.Tensor) -> ir.Variable:
    """|y| as LeakyRelu(alpha=-1), which onnxruntime computes in place (Abs is not); -0 stays -0."""
    return b.op("LeakyRelu", [y], "abs", {"alpha": -1.0})


def _e4m3_magnitude(b: _Builder, a: ir.Tensor, unit: float = 1.0) -> ir.Variable:
    """E4M3 RNE of a = |y| >= 0, saturating at 448 (Inf too), NaN kept: Veltkamp split.

    ``unit`` (a power of two) scales the format: a = |y| * unit gives E4M3(|y|) * unit, exactly.
    """
    top = np.float32(_E4M3_MAX * unit)
    sat = b.op("Clip", [a, b.const("zero", np.float32(0.0)), b.const("e4m3_max", top)], "saturated")
    # c = max(sat, 2^-6) * (2^20 + 1) as clip(sat * (2^20 + 1), fl(2^-6 * (2^20 + 1)), inf): same value
    low = np.float32(_E4M3_MIN_NORMAL * unit) * np.float32(_E4M3_SPLIT)
    c = b.op(
        "Clip",
        [
            b.op("Mul", [sat, b.const("split", np.float32(_E4M3_SPLIT))], "split_raw"),
            b.const("split_low", low),
            b.const("inf", np.float32(np.inf)),
        ],
        "split",
    )
    return b.op("Sub", [c, b.op("Sub", [c, sat], "split_diff")], "rounded")


def _signed_zero_factor(b: _Builder, t: ir.Tensor, threshold: float, bound: float) -> ir.Variable:
    """``bound * sign(t)`` (signed zeros kept) wherever ``|t| >= threshold``; a signed fraction of
    ``bound`` below (only used where the rounded magnitude is 0, so the zero gets the sign of t)."""
    slope = np.float32(2.0 ** int(np.ceil(np.log2(bound / threshold))))
    return b.op(
        "Clip",
        [
            b.op("Mul", [t, b.const("sign_slope", slope)], "sign_scaled"),
            b.const("sign_lo", np.float32(-bound)),
            b.const("sign_hi", np.float32(bound)),
        ],
        "sign",
    )


def emit_cast_activation(graph: ir.Graph, x: ir.Tensor, scale: float, fmt_name: str, name: str) -> ir.Tensor:
    """x' = s * FP8(x / s): static FP8 fake-quant, exact.

    FP8 E4M3 is computed with float arithmetic (module docstring); other FP8 formats use
    ``Cast(Cast(x / s -> FP8, saturate) -> float) * s``. Not QuantizeLinear/DequantizeLinear:
    onnxruntime 1.32's QDQ propagation and Relu+Q fusion corrupt FP8 Q/DQ chains at
    ORT_ENABLE_EXTENDED (it drops a Relu before an FP8 Q), and ORT never fuses FP8 x FP8 compute.
    """
    fmt = get_format(fmt_name)
    b = _Builder(graph, name)
    s32 = np.float32(scale)
    s = b.const("scale", s32)
    if fmt_name == "fp8_e4m3":
        # z = x / (s 2^-k) = (x / s) 2^k exactly; E4M3 in units of 2^k; the factor clip(z, -s 2^-k,
        # s 2^-k) is +-s 2^-k wherever the result is not zero (|x / s| > 2^-10 gives |z| >= s 2^-k
        # by the choice of k) and a signed fraction (so a signed zero) elsewhere:
        # hi_z * (+-s 2^-k) = +-fl(E4M3(x / s) * s).
        k = int(np.ceil((10.0 + np.log2(float(s32))) / 2.0))
        bound = np.float32(np.ldexp(s32, -k))
        z = b.op("Div", [x, b.const("scale_k", bound)], "scaled")
        sign = b.op("Clip", [z, b.const("sign_lo", -bound), b.const("sign_hi", bound)], "sign")
        hi = _e4m3_magnitude(b, _abs_in_place(b, z), 2.0**k)
        return b.op("Mul", [hi, sign], "dequantized")
    code = b.op("Cast", [b.op("Div", [x, s], "scaled")], "codes", {"to": fmt.onnx_dtype, "saturate": 1})
    return b.op("Mul", [b.op("Cast", [code], "values", {"to": onnx.TensorProto.FLOAT}), s], "dequantized")


def emit_mx_activation(
    graph: ir.Graph, x: ir.Tensor, k: int, fmt_name: str, name: str, axis: int = -1, rank: int = 0
) -> ir.Tensor:
    """Dynamic MX fake-quant over 32-blocks of ``axis`` (length ``k``, static; the reduction axis).

    An axis of at most 32 is one (short) block: the amax is a reduction over the axis itself. A
    longer one is split into (blocks, 32) by a Reshape in place (a non-last axis needs the input's
    ``rank``, that of a Conv weight); a length that is not a multiple of 32 is split into the full
    blocks and the short last block (the codec's zero padding changes no amax).
    """
    fmt = get_format(fmt_name)
    if not isinstance(fmt, MXFormat) or not fmt.element.name.startswith("fp8_e4m3"):
        raise ValueError(f"{fmt_name} activations are not supported")
    block = fmt.block_size
    b = _Builder(graph, name)
    if k <= block:
        return _mx_blocks(b, x, axis, fmt)
    last = axis == -1 or (rank > 0 and axis == rank - 1)
    if k % block:
        full = k - k % block
        head, tail = ir.make_variable(graph, f"{name}_full"), ir.make_variable(graph, f"{name}_tail")
        ir.make_node(
            graph,
            "Split",
            [x, b.const("split", [full, k - full], np.int64)],
            [head, tail],
            f"{name}_split",
            {"axis": axis},
        )
        parts = [
            emit_mx_activation(graph, head, full, fmt_name, f"{name}_f", axis, rank),
            _mx_blocks(_Builder(graph, f"{name}_t"), tail, axis, fmt),
        ]
        return b.op("Concat", parts, "dequantized", {"axis": axis})
    shape = b.op("Shape", [x], "shape")
    if last:  # any input rank (a MatMul input may have more dims than its weight)
        lead = b.op("Slice", [shape, b.const("s0", [0], np.int64), b.const("s1", [-1], np.int64)], "lead")
        blocked_shape: ir.Tensor = b.op(
            "Concat", [lead, b.const("tail", [k // block, block], np.int64)], "blocked_shape", {"axis": 0}
        )
        block_axis = -1
    else:
        if rank <= 0:
            raise ValueError(f"MX activations along axis {axis} need the input's rank")
        axis = axis % rank
        dims = [0] * axis + [k // block, block] + ([] if axis == rank - 1 else [-1])
        blocked_shape = b.const("blocked_shape", dims, np.int64)
        block_axis = axis + 1
    deq = _mx_blocks(b, b.op("Reshape", [x, blocked_shape], "blocks"), block_axis, fmt)
    return b.op("Reshape", [deq, shape], "dequantized")


def _mx_blocks(b: _Builder, xb: ir.Tensor, block_axis: int, fmt: MXFormat) -> ir.Variable:
    """MX fake-quant of ``xb`` with one block along ``block_axis`` (32 or fewer elements)."""
    scale, inv = _mx_block_scales(b, _mx_block_amax(b, xb, block_axis), fmt)
    y = b.op("Mul", [xb, inv], "scaled")
    # non-zero results have |y| > 2^-10: the factor is +-1 there (a signed fraction where hi = 0).
    # (Not clip(y, -2^-10, 2^-10) with 2^10 folded into 2^X: that overflows for X > 117.)
    sign = _signed_zero_factor(b, y, 2.0**-10, 1.0)
    hi = _e4m3_magnitude(b, _abs_in_place(b, y))
    return b.op("Mul", [b.op("Mul", [hi, sign], "signed"), scale], "deq_blocks")


def _mx_block_amax(b: _Builder, xb: ir.Tensor, block_axis: int) -> ir.Tensor:
    """Per-block max |x| over the finite elements (the codec ignores NaN and Inf).

    Masking the non-finite elements costs three full passes that write (x - x is NaN exactly
    there, IsNaN, Where), a fifth of an MXFP8 ppocr_rec: they run in an If branch taken only when
    the tensor's sum is not finite (any NaN or Inf; a sum that overflows takes it too, harmlessly).
    The other branch reads the tensor twice and writes nothing: max(ReduceMax(x), -ReduceMin(x)).
    """
    total = b.op("ReduceSum", [xb], "sum", {"keepdims": 0})
    nonfinite_sum = b.op("IsNaN", [b.op("Sub", [total, total], "sum_minus_sum")], "any_nonfinite")
    graph = b.graph
    start = len(graph.nodes)
    nonfinite = b.op("IsNaN", [b.op("Sub", [xb, xb], "x_minus_x")], "nonfinite")
    finite = b.op("Where", [nonfinite, b.const("zero", np.float32(0.0)), xb], "finite")
    masked = b.reduce_max(_abs_in_place(b, finite), "amax_masked", block_axis)
    masked_nodes = graph.nodes[start:]
    start = len(graph.nodes)
    top = b.reduce_max(xb, "block_max", block_axis)
    bottom = b.op("Neg", [b.reduce("ReduceMin", xb, "block_min", block_axis)], "block_min_neg")
    plain = b.op("Max", [top, bottom], "amax_plain")
    plain_nodes = graph.nodes[start:]
    masked.dtype = plain.dtype = np.float32
    amax = ir.make_variable(graph, f"{b.prefix}_amax", dtype=np.float32)
    ir.make_node(
        graph,
        "If",
        [nonfinite_sum],
        [amax],
        f"{b.prefix}_amax",
        {
            "then_branch": ir.make_body(graph, masked_nodes, [masked]),
            "else_branch": ir.make_body(graph, plain_nodes, [plain]),
        },
    )
    return amax


def _mx_block_scales(b: _Builder, amax: ir.Tensor, fmt: MXFormat) -> tuple[ir.Variable, ir.Variable]:
    """(2^X, 2^-X) per block: X = clip(E - emax, -127, cap), E = min{j : amax <= 1.75 * 2^j}.

    u = amax / 1.75 (exact at the thresholds: u > 2^j iff amax > 1.75 * 2^j); P = 2^RNE(log2 u)
    from a table, u / P in (0.7, 1.42), so 2^E = P * ceil(u / P) exactly. amax = 0 gives
    ceil(0) = 0 and the clip gives 2^-127.
    """
    u = b.op("Div", [amax, b.const("r175", np.float32(1.75))], "u")
    code = b.op(
        "QuantizeLinear",
        [b.op("Log", [u], "u_log"), b.const("ln2", np.float32(np.log(2.0))), b.const("e_zp", _MX_ZP, np.uint8)],
        "u_exp",
    )
    index = b.op("Cast", [code], "u_exp_i32", {"to": onnx.TensorProto.INT32})
    p = b.lookup(b.shared("onnxcomp_mx_pow2", _mx_pow2_table()), index, u, "u_pow2")
    ratio = b.op("Ceil", [b.op("Div", [u, p], "u_ratio")], "u_ceil")
    cap = fmt._max_exponent  # noqa: SLF001 - the codec's float32 overflow cap
    scaled = b.op(
        "Mul", [b.op("Mul", [p, b.const("emax_scale", np.float32(2.0**-fmt.emax_elem))], "p_emax"), ratio], "x_raw"
    )
    scale = b.op(
        "Clip",
        [scaled, b.const("xmin", np.float32(2.0**-127)), b.const("xmax", np.float32(2.0**cap))],
        "scale",
    )
    return scale, b.op("Reciprocal", [scale], "inv_scale")
