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

HiF8: ``onnxcomp.quant.hif8_subgraph`` (re-exported here).

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
import onnx

from onnxcomp import ir
from onnxcomp.formats import MXFormat, get_format
from onnxcomp.quant.hif8_subgraph import emit_hif8_activation
from onnxcomp.quant.subgraph_builder import SubgraphBuilder, abs_in_place

__all__ = ["emit_cast_activation", "emit_hif8_activation", "emit_mx_activation"]


# FP8 E4M3 (and the MX elements)
_E4M3_MAX = 448.0
_E4M3_MIN_NORMAL = 2.0**-6
_E4M3_SPLIT = 2.0**20 + 1  # Veltkamp constant for 24 - 20 = 4 significant bits

# MX block exponents: index = RNE(log2(amax / 1.75)) + _MX_ZP
_MX_ZP = 121


def _mx_pow2_table() -> np.ndarray:
    """T[i] = 2^(i - 121), float32, 256 entries (2^-121 .. 2^127; the top entries are unused)."""
    e = np.minimum(np.arange(256) - _MX_ZP, 127)
    return np.ldexp(np.float32(1), e.astype(np.int32)).astype(np.float32)


def _e4m3_magnitude(b: SubgraphBuilder, a: ir.Tensor, unit: float = 1.0) -> ir.Variable:
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


def _signed_zero_factor(b: SubgraphBuilder, t: ir.Tensor, threshold: float, bound: float) -> ir.Variable:
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
    b = SubgraphBuilder(graph, name)
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
        hi = _e4m3_magnitude(b, abs_in_place(b, z), 2.0**k)
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
    b = SubgraphBuilder(graph, name)
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
            _mx_blocks(SubgraphBuilder(graph, f"{name}_t"), tail, axis, fmt),
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


def _mx_blocks(b: SubgraphBuilder, xb: ir.Tensor, block_axis: int, fmt: MXFormat) -> ir.Variable:
    """MX fake-quant of ``xb`` with one block along ``block_axis`` (32 or fewer elements)."""
    scale, inv = _mx_block_scales(b, _mx_block_amax(b, xb, block_axis), fmt)
    y = b.op("Mul", [xb, inv], "scaled")
    # non-zero results have |y| > 2^-10: the factor is +-1 there (a signed fraction where hi = 0).
    # (Not clip(y, -2^-10, 2^-10) with 2^10 folded into 2^X: that overflows for X > 117.)
    sign = _signed_zero_factor(b, y, 2.0**-10, 1.0)
    hi = _e4m3_magnitude(b, abs_in_place(b, y))
    return b.op("Mul", [b.op("Mul", [hi, sign], "signed"), scale], "deq_blocks")


def _mx_block_amax(b: SubgraphBuilder, xb: ir.Tensor, block_axis: int) -> ir.Tensor:
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
    masked = b.reduce_max(abs_in_place(b, finite), "amax_masked", block_axis)
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


def _mx_block_scales(b: SubgraphBuilder, amax: ir.Tensor, fmt: MXFormat) -> tuple[ir.Variable, ir.Variable]:
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
