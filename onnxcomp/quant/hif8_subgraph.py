"""HiF8 activation fake-quantization as a standard ONNX subgraph, bit-exact with the codec
(``onnxcomp.formats`` HiF8, docs/formats.md). See ``quant.activation_subgraphs`` for the cost model.

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
keeps >= 0 (Relu, MaxPool(Relu), ...) skips the sign.

Per-token HiF8 (s = max|x| / 16 per vector, so |y| <= 16: no clamp, no Inf) rounds the signed
value instead of |y| and its sign (4 passes fewer: ~10% of a per-token ppocr_rec)::

    i  = QuantizeLinear(HardSigmoid(log|y|), zero point 1)    binade + 126; NaN alone gets 0
    v  = y * R[i]                                           R[0] = NaN
    n  = int32(v + clip(v, -(1/2)^-, (1/2)^-)) -> float       RNA, every zero +0, NaN -> INT_MIN
    x' = n / R[i] * s                                       INT_MIN / NaN = NaN

The cast truncates toward zero, so it is ``floor(|v| + (1/2)^-)`` with the sign of v (the clip is
+-(1/2)^- for |v| >= 1/2 and v itself below, where |2v| < 1 truncates to 0), and an int32 zero
converts back to +0: HiF8 has no -0.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.quant.subgraph_builder import F32_MAX, F32_TINY, HALF_DOWN, SubgraphBuilder, abs_in_place

# HiF8: index i = RNE(log2(|y| / sqrt 2)) + _HIF8_ZP = floor(log2 |y|) + _HIF8_ZP (up to the
# tolerated error near powers of two), saturated to 0..255 by QuantizeLinear; log2 of the largest
# float32 gives 254, so only +-Inf reaches 255. NaN gives 0.
_HIF8_ZP = 126
_HIF8_MAX = 2.0**15
_HIF8_UNDERFLOW = 2.0**-23  # |y| below this rounds to 0


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
    table[255] = F32_MAX  # +-Inf: Inf * r / r = Inf
    return table.astype(np.float32)


def _hif8_magnitude(b: SubgraphBuilder, a: ir.Tensor, saturate: bool = True) -> ir.Variable:
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
    n = b.op("Floor", [b.op("Add", [steps, b.const("half", np.float32(HALF_DOWN))], "plus_half")], "rna")
    return b.op("Div", [n, r], "rounded")


def _hif8_negative(b: SubgraphBuilder, t: ir.Tensor, threshold: float) -> ir.Variable:
    """Bool mask ``t <= -threshold``: the values whose HiF8 result is negative (a zero result is +0)."""
    below = np.nextafter(np.float32(threshold), np.float32(0))
    return b.op("Less", [t, b.const("neg_threshold", -below)], "negative")


def _signed_factor(b: SubgraphBuilder, negative: ir.Tensor, magnitude: float) -> ir.Variable:
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
    b = SubgraphBuilder(graph, name)
    signed = not _never_negative(x)
    if scale is None:
        return _hif8_per_token(b, x, axis, signed)
    s32 = np.float32(scale)
    const_s = b.const("scale", s32)
    if not signed:
        return b.op("Mul", [_hif8_magnitude(b, b.op("Div", [x, const_s], "scaled")), const_s], "dequantized")
    negative = _hif8_negative(b, x, _static_hif8_threshold(s32))
    q = _hif8_magnitude(b, abs_in_place(b, b.op("Div", [x, const_s], "scaled")))
    return b.op("Mul", [q, _signed_factor(b, negative, float(s32))], "dequantized")


def _hif8_per_token(b: SubgraphBuilder, x: ir.Tensor, axis: int, signed: bool) -> ir.Variable:
    """Per-token HiF8 on the signed values (module docstring): no sign mask, no sign table."""
    amax = b.reduce_max(b.op("Abs", [x], "x_abs") if signed else x, "amax", axis)
    s = b.op(
        "Max",
        [b.op("Div", [amax, b.const("target", np.float32(16.0))], "raw_scale"), b.const("tiny", np.float32(F32_TINY))],
        "scale",
    )
    # |y| = |x| / s <= 16 (a few ulps more, from rounding s): no saturation. A row whose amax is
    # NaN or Inf gives NaN or 0, never Inf.
    y = b.op("Div", [x, s], "scaled")
    index = _hif8_binade_nan_apart(b, abs_in_place(b, y) if signed else y)
    r = b.lookup(b.shared("onnxcomp_hif8_token_inv_step", _hif8_token_reciprocal_step_table()), index, y, "inv_step")
    v = b.op("Mul", [y, r], "steps")
    if signed:  # + (1/2)^- with the sign of v (and 2v, truncated to 0, where |v| < 1/2)
        half = b.op(
            "Clip", [v, b.const("neg_half", np.float32(-HALF_DOWN)), b.const("half", np.float32(HALF_DOWN))], "half"
        )
    else:
        half = b.const("half", np.float32(HALF_DOWN))
    shifted = b.op("Add", [v, half], "plus_half")
    truncated = b.op("Cast", [shifted], "rna_i32", {"to": onnx.TensorProto.INT32})
    n = b.op("Cast", [truncated], "rna", {"to": onnx.TensorProto.FLOAT})
    return b.op("Mul", [b.op("Div", [n, r], "rounded"), s], "dequantized")


def _hif8_binade_nan_apart(b: SubgraphBuilder, a: ir.Tensor) -> ir.Variable:
    """int32 index binade + 126 of a = |y| >= 0 as ``_hif8_magnitude`` computes it, but with
    QuantizeLinear's zero point 1: zero (and a < 2^-124) gets 1, NaN alone gets 0 (QuantizeLinear
    sends NaN to the bottom of the range), +Inf 255."""
    log = b.op("Log", [a], "log")
    slope = np.float32(1.0 / (512.0 * np.log(2.0)))
    offset = np.float32((_HIF8_ZP - 1 - 0.5) / 512.0)
    shifted = b.op("HardSigmoid", [log], "log2_affine", {"alpha": float(slope), "beta": float(offset)})
    code = b.op(
        "QuantizeLinear", [shifted, b.const("step", np.float32(1.0 / 512.0)), b.const("zp", 1, np.uint8)], "binade"
    )
    return b.op("Cast", [code], "binade_i32", {"to": onnx.TensorProto.INT32})


def _hif8_token_reciprocal_step_table() -> np.ndarray:
    """``_hif8_reciprocal_step_table`` for ``_hif8_binade_nan_apart``'s index: R[0] = NaN (so a NaN
    element stays NaN through the int32 cast), R[1] = 2^22 (zero and every |y| < 2^-23)."""
    table = _hif8_reciprocal_step_table()
    table[0], table[1], table[255] = np.nan, np.float32(2.0**22), 1.0  # |y| <= 16: no Inf
    return table
