"""GPTQ: weight rounding with second-order error feedback, for every weight format.

GPTQ (Frantar et al., 2022, arXiv:2210.17323) quantizes a layer's weight one input column at a
time and spreads each column's rounding error over the columns not yet quantized, so that the
layer's output on calibration data, ``X W^T``, changes as little as possible. With
``H = mean(X^T X)`` (:class:`onnxcomp.calibration.gram.InputGram`) and ``U`` the upper Cholesky
factor of the damped ``H^-1`` (:func:`onnxcomp.calibration.gram.damped_inverse_cholesky`), column
``j`` is rounded to ``q_j`` and the rest is updated by ``W[:, j+1:] -= (w_j - q_j) / U_jj * U[j, j+1:]``
(the optimal-brain-surgeon update), lazily in blocks of ``block`` columns.

The grid is fixed first: :func:`gptq_quantize` takes the scales, zero points, shared exponents
and FP8 group scales that round-to-nearest (:func:`onnxcomp.quant.weights.quantize_weight`, with
the spec's observer) chooses for the original weight, and GPTQ only changes which code each
element gets on that grid ("nearest value on the grid" through the format's own codec). So it
works for every format and granularity ``quantize_weight`` supports -- int8/uint8/int4/uint4 per
tensor, channel or group, fp8_e4m3/e5m2, hif8, fp4_e2m1/e1m2 (also with two-level FP8 group
scales) and mxfp8/mxfp4 -- and the result has the same storage, scale and zero point as RTN, with
``dequantized`` bit-identical to what DequantizeLinear computes from the new codes.
``act_order`` quantizes the columns in decreasing ``diag(H)`` order, with the groups' scales still
those of the original grouping ("static groups").

The weight is handled as a matrix ``M`` of (output channel, reduction ...): the layout's channel
axis first, then its reduction axis, then any remaining axes (a Conv ``W.reshape(Cout, -1)``; a
Gemm/MatMul ``(K, N)`` weight transposed). The Hessian's columns follow that order. A grouped
Conv passes one ``(d, d)`` block per group (``(group, d, d)``), the output channels split into
equal consecutive groups. Input columns never driven on the data (``diag H == 0``) keep their
round-to-nearest codes: nothing propagates into or out of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp.calibration.gram import damped_inverse_cholesky
from onnxcomp.errors import ConfigError
from onnxcomp.formats import ElementFormat, IntegerFormat, MXFormat, get_format
from onnxcomp.ir import WeightLayout
from onnxcomp.quant.lowbit import INT_FACTOR, lowbit_storage
from onnxcomp.quant.qweight import QuantizedWeight, storage_array
from onnxcomp.quant.spec import TensorSpec
from onnxcomp.quant.weights import quantize_weight

__all__ = ["FixedGrid", "fixed_grid", "gptq_quantize", "to_matrix", "from_matrix", "quantize_on_grid"]


# --- the weight as a matrix --------------------------------------------------------------------


def _matrix_axes(ndim: int, layout: WeightLayout) -> list[int]:
    c, r = layout.channel_axis % ndim, layout.reduction_axis % ndim
    return [c, r] + [a for a in range(ndim) if a not in (c, r)]


def to_matrix(a: np.ndarray, layout: WeightLayout) -> np.ndarray:
    """``a`` (weight-shaped) as (output channels, reduction x remaining axes)."""
    moved = np.transpose(a, _matrix_axes(a.ndim, layout))
    return moved.reshape(moved.shape[0], -1)


def from_matrix(m: np.ndarray, shape: tuple[int, ...], layout: WeightLayout) -> np.ndarray:
    """Inverse of :func:`to_matrix` for a weight of ``shape``."""
    axes = _matrix_axes(len(shape), layout)
    moved = m.reshape([shape[a] for a in axes])
    return np.ascontiguousarray(np.transpose(moved, np.argsort(axes)))


# --- a fixed quantization grid -----------------------------------------------------------------


def _per_element(p: np.ndarray, shape: tuple[int, ...], axis: int | None, block: int) -> np.ndarray:
    """A DequantizeLinear parameter (scalar, per axis, or blocked) expanded to ``shape``."""
    p = np.asarray(p)
    if p.ndim == 0 or axis is None:
        return np.broadcast_to(p.reshape(()), shape)
    if block:
        return np.repeat(p, block, axis=axis).take(np.arange(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(p.reshape(view), shape)


@dataclass
class FixedGrid:
    """Per-element grid of a quantized weight: ``value = element(code) * scale`` (or the integer form).

    ``codec`` is the element codec (an integer format, or the element format of a float/MX one),
    ``scale`` the float32 per-element step (``s_c * g8`` for two-level scales, ``2^X`` for MX),
    ``zero`` the integer zero point per element (integer formats only); ``live`` is False where
    the step is zero (a two-level all-zero group: code 0). Arrays have the weight's shape, or a
    matrix shape after :meth:`as_matrix`.
    """

    codec: IntegerFormat | ElementFormat
    scale: np.ndarray
    zero: np.ndarray | None
    live: np.ndarray | None = None

    def as_matrix(self, layout: WeightLayout) -> FixedGrid:
        def m(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.ascontiguousarray(to_matrix(a, layout))

        scale = m(self.scale)
        assert scale is not None
        return FixedGrid(self.codec, scale, m(self.zero), m(self.live))

    def round(self, x: np.ndarray, where: slice | np.ndarray | int = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(codes, values) of ``x`` rounded to the nearest grid point at positions ``[..., where]``."""
        scale = self.scale[..., where]
        if isinstance(self.codec, IntegerFormat):
            assert self.zero is not None
            zero = self.zero[..., where]
            codes = self.codec.quantize(x, scale, zero)
            return codes, self.codec.dequantize(codes, scale, zero)
        codes = self.codec.encode(np.divide(np.asarray(x, np.float32), scale))
        if self.live is not None:
            codes = np.where(self.live[..., where], codes, 0).astype(np.uint8)
        return codes, np.multiply(self.codec.decode(codes), scale, dtype=np.float32)


def _element_scale(qw: QuantizedWeight, elem: ElementFormat, fp4_storage: str) -> np.ndarray:
    """The scale the element codes were divided by (the stored scale undoes the x2/x4 integer codes)."""
    factor = INT_FACTOR.get(elem.name, 1)
    if elem.name == "fp4_e2m1" and fp4_storage == "float4e2m1":
        factor = 1
    return np.asarray(qw.scale, np.float32) * np.float32(factor)


def fixed_grid(
    qw: QuantizedWeight, shape: tuple[int, ...], layout: WeightLayout, fp4_storage: str = "int8"
) -> FixedGrid:
    """The per-element grid of a round-to-nearest :class:`QuantizedWeight` of a weight of ``shape``."""
    fmt = get_format(qw.spec.dtype)
    if isinstance(fmt, IntegerFormat):
        assert qw.zero_point is not None
        scale = _per_element(np.asarray(qw.scale, np.float32), shape, qw.axis, qw.block_size)
        zero = _per_element(np.asarray(qw.zero_point).astype(np.int32), shape, qw.axis, qw.block_size)
        return FixedGrid(fmt, np.ascontiguousarray(scale), np.ascontiguousarray(zero))
    if isinstance(fmt, MXFormat):
        scale = _element_scale(qw, fmt.element, fp4_storage)
        return FixedGrid(fmt.element, np.ascontiguousarray(_per_element(scale, shape, qw.axis, qw.block_size)), None)
    if qw.storage == "dq2":
        assert qw.group_scale_codes is not None and qw.spec.scale_format is not None
        fp8 = get_format(qw.spec.scale_format)
        assert isinstance(fp8, ElementFormat)
        s_c = _per_element(_element_scale(qw, fmt, "int8"), shape, layout.channel_axis % len(shape), 0)
        g8 = _per_element(fp8.decode(qw.group_scale_codes.view(np.uint8)), shape, qw.axis, qw.block_size)
        eff = np.multiply(s_c, g8, dtype=np.float32)
        live = eff > 0
        return FixedGrid(fmt, np.where(live, eff, np.float32(1)), None, live)
    scale = _per_element(_element_scale(qw, fmt, fp4_storage), shape, qw.axis, qw.block_size)
    return FixedGrid(fmt, np.ascontiguousarray(scale), None)


def quantize_on_grid(
    codes: np.ndarray, values: np.ndarray, rtn: QuantizedWeight, fp4_storage: str = "int8"
) -> QuantizedWeight:
    """``rtn`` with its codes replaced by element ``codes`` (values ``values``) on the same grid."""
    fmt = get_format(rtn.spec.dtype)
    if isinstance(fmt, IntegerFormat):
        stored = storage_array(codes, fmt)
    elif rtn.storage == "dq2":
        import ml_dtypes

        assert isinstance(fmt, ElementFormat)
        ints = np.rint(fmt.decode(codes) * INT_FACTOR[fmt.name]).astype(np.int8)
        stored = ints.astype(ml_dtypes.int4) if fmt.name == "fp4_e1m2" else ints
    else:
        elem = fmt.element if isinstance(fmt, MXFormat) else fmt
        assert isinstance(elem, ElementFormat)
        stored = lowbit_storage(elem, codes, np.asarray(rtn.scale, np.float32), fp4_storage)[0]
    return QuantizedWeight(
        stored,
        rtn.scale,
        rtn.zero_point,
        rtn.axis,
        rtn.block_size,
        np.ascontiguousarray(values, dtype=np.float32),
        rtn.spec,
        rtn.storage,
        rtn.group_scale_codes,
    )


# --- GPTQ ------------------------------------------------------------------------------------


def _gptq_rows(
    m: np.ndarray, grid: FixedGrid, hessian: np.ndarray, act_order: bool, damp: float, block: int
) -> tuple[np.ndarray, np.ndarray]:
    """(codes, values) of the rows ``m`` (float64, (rows, d)) that share ``hessian`` (d, d)."""
    d = m.shape[1]
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(d)
    h = hessian[np.ix_(order, order)]
    u = damped_inverse_cholesky(h, damp)
    w = m[:, order].copy()
    codes = np.empty(m.shape, dtype=np.int32)
    values = np.empty(m.shape, dtype=np.float32)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        u1 = u[i1:i2, i1:i2]
        err = np.zeros((w.shape[0], i2 - i1))
        for i in range(i2 - i1):
            j = i1 + i
            col = order[j]
            c, v = grid.round(w[:, j], col)
            codes[:, col] = c
            values[:, col] = v
            e = (w[:, j] - v.astype(np.float64)) / u1[i, i]
            w[:, j + 1 : i2] -= np.outer(e, u1[i, i + 1 :])
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return codes, values


def gptq_quantize(
    w: np.ndarray,
    spec: TensorSpec,
    layout: WeightLayout,
    hessian: np.ndarray,
    *,
    name: str = "",
    fp4_storage: str = "int8",
    act_order: bool = False,
    damp: float = 0.01,
    block: int = 128,
    input_energy: np.ndarray | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` per ``spec`` on the round-to-nearest grid, choosing codes by GPTQ.

    ``hessian``: the mean ``X^T X`` of the layer's design matrix, ``(d, d)`` with ``d`` the
    columns of the weight as a matrix (see the module docstring), or ``(group, d, d)`` for a
    grouped Conv. ``damp`` is the relative diagonal damping (of ``mean(diag H)``), ``block`` the
    lazy-update width. ``input_energy`` is passed to ``quantize_weight`` for the ``output_mse``
    observer. Raises ConfigError when the Hessian does not match the weight.
    """
    if block < 1:
        raise ConfigError(f"weight {name!r}: GPTQ block must be >= 1, got {block}")
    w32 = np.asarray(w, dtype=np.float32)
    rtn = quantize_weight(w32, spec, layout, name, fp4_storage, input_energy)
    grid = fixed_grid(rtn, w32.shape, layout, fp4_storage).as_matrix(layout)
    m = to_matrix(w32, layout).astype(np.float64)
    rows, d = m.shape
    h = np.asarray(hessian, dtype=np.float64)
    blocks = h[None] if h.ndim == 2 else h
    if blocks.ndim != 3 or blocks.shape[1:] != (d, d) or rows % blocks.shape[0]:
        raise ConfigError(
            f"weight {name!r}: Hessian of shape {h.shape} does not fit the weight's matrix ({rows} rows, {d} columns)"
        )
    per = rows // blocks.shape[0]
    codes = np.empty(m.shape, np.int32)
    values = np.empty(m.shape, np.float32)
    for g, hg in enumerate(blocks):
        part = slice(g * per, (g + 1) * per)
        sub = FixedGrid(
            grid.codec,
            grid.scale[part],
            None if grid.zero is None else grid.zero[part],
            None if grid.live is None else grid.live[part],
        )
        codes[part], values[part] = _gptq_rows(m[part], sub, hg, act_order, damp, block)
    dtype = np.uint8 if isinstance(grid.codec, ElementFormat) else grid.codec.storage_dtype
    shape = w32.shape
    return quantize_on_grid(
        from_matrix(codes, shape, layout).astype(dtype), from_matrix(values, shape, layout), rtn, fp4_storage
    )
