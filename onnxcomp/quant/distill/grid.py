"""A quantized weight as learnable variables: AdaRound-style rounding and LSQ-style scales.

Every DequantizeLinear storage computes ``w' = (code - zero_point) * scale`` per element, whatever
the format: integer codes, element-float values times an integer factor (FP4 stored as INT8),
FP8 codes, MX blocks with power-of-two scales. So the rounding is learned in *code units*: the two
neighbours of ``w / scale + zero_point`` on the sorted grid of stored codes the format allows,
and a soft choice between them (rectified sigmoid, annealed to hard). The learned weight is
always written back in the storage the quantizer chose, and checked bit-exact against it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from onnxcomp.formats import ElementFormat, IntegerFormat, MXFormat, get_format
from onnxcomp.quant.lowbit import INT_FACTOR
from onnxcomp.quant.qweight import QuantizedWeight

#: Rectified-sigmoid stretch of AdaRound (Nagel et al. 2020): h = clip(sigmoid(v) (ZETA - GAMMA) + GAMMA, 0, 1).
ZETA, GAMMA = 1.1, -0.1


def _storage_is_integer(codes: np.ndarray) -> bool:
    return codes.dtype.name in ("int8", "uint8", "int4", "uint4", "int16", "uint16")


def code_grid(qw: QuantizedWeight) -> np.ndarray:
    """Sorted stored-code values (float64) the weight's format allows, in DequantizeLinear code units."""
    fmt = get_format(qw.spec.dtype)
    if isinstance(fmt, MXFormat):
        fmt = fmt.element
    if isinstance(fmt, IntegerFormat):
        return np.arange(fmt.qmin, fmt.qmax + 1, dtype=np.float64)
    assert isinstance(fmt, ElementFormat)
    values = fmt.values.astype(np.float64)
    if fmt.name in INT_FACTOR and _storage_is_integer(qw.codes):
        values = values * INT_FACTOR[fmt.name]  # FP4 values stored as exact integer multiples
    return values


def expand(unit: np.ndarray, qw: QuantizedWeight, shape: tuple[int, ...]) -> np.ndarray:
    """A per-unit array (the layout of ``qw.scale``) broadcast to one value per weight element."""
    unit = np.asarray(unit)
    if unit.ndim == 0:
        return np.broadcast_to(unit, shape)
    assert qw.axis is not None
    if qw.block_size:
        full = np.repeat(unit, qw.block_size, axis=qw.axis)
        return np.take(full, np.arange(shape[qw.axis]), axis=qw.axis)
    view = [1] * len(shape)
    view[qw.axis] = -1
    return np.broadcast_to(unit.reshape(view), shape)


def reduce(grad: np.ndarray, qw: QuantizedWeight, unit_shape: tuple[int, ...]) -> np.ndarray:
    """The adjoint of :func:`expand`: per-element gradients summed over each scaling unit."""
    if not unit_shape:
        return np.asarray(grad.sum())
    assert qw.axis is not None
    if qw.block_size:
        axis, size = qw.axis, qw.block_size
        pad = [(0, 0)] * grad.ndim
        pad[axis] = (0, unit_shape[axis] * size - grad.shape[axis])
        padded = np.pad(grad, pad)
        split = padded.shape[:axis] + (unit_shape[axis], size) + padded.shape[axis + 1 :]
        return padded.reshape(split).sum(axis=axis + 1)
    others = tuple(a for a in range(grad.ndim) if a != qw.axis)
    return grad.sum(axis=others)


def rect_sigmoid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(h, dh/dv) of AdaRound's rectified sigmoid."""
    sig = 1.0 / (1.0 + np.exp(-v))
    raw = sig * (ZETA - GAMMA) + GAMMA
    h = np.clip(raw, 0.0, 1.0)
    dh = np.where((raw > 0.0) & (raw < 1.0), sig * (1.0 - sig) * (ZETA - GAMMA), 0.0)
    return h, dh


@dataclass
class GridWeight:
    """One weight's learnable quantization: neighbours ``low``/``high`` (code units), scales, zero points.

    ``low == high`` where the weight sits exactly on a grid point (pruned zeros stay exactly zero)
    or beyond the grid's ends (clipped).
    """

    qw: QuantizedWeight
    low: np.ndarray
    high: np.ndarray
    frac: np.ndarray  # where w / s + z lies between low and high, in [0, 1)
    scale0: np.ndarray  # float64 per unit (RTN's)
    zero: np.ndarray  # float64 per element
    learn_scale: bool  # False for MX: its block scales are powers of two
    rtn: np.ndarray  # round-to-nearest's codes in the same units as low/high

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.low.shape)

    def element_scale(self, log_scale: np.ndarray) -> np.ndarray:
        """Per-element scales in float64 while learning (the deployed float32 ones: :meth:`dequantize`)."""
        return expand(self.scale0 * np.exp(log_scale), self.qw, self.shape)

    def unit_scale(self, log_scale: np.ndarray) -> np.ndarray:
        """The float32 per-unit scale the deployed model stores (RTN's times exp(log_scale))."""
        return (self.scale0 * np.exp(log_scale)).astype(np.float32)

    def initial_v(self) -> np.ndarray:
        """Rounding variables whose soft choice starts at the exact fractional position."""
        p = np.clip((self.frac - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
        return np.log(p / (1.0 - p)).astype(np.float32)

    def soft(self, v: np.ndarray, log_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(w', dw'/dv, code - zero, element scale) for soft rounding variables ``v``."""
        h, dh = rect_sigmoid(v.astype(np.float64))
        s = self.element_scale(log_scale)
        step = self.high - self.low
        q = self.low + h * step - self.zero
        return q * s, dh * step * s, q, s

    def hard_codes(self, v: np.ndarray) -> np.ndarray:
        """The final choice: the upper neighbour where the soft choice is past one half."""
        return np.where(v >= 0.0, self.high, self.low)

    def dequantize(self, codes: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
        """Exactly what DequantizeLinear computes for these codes and scales."""
        s = expand(self.unit_scale(log_scale), self.qw, self.shape)
        return np.multiply((codes - self.zero).astype(np.float32), s, dtype=np.float32)

    def to_quantized(self, codes: np.ndarray, log_scale: np.ndarray, algorithm: dict[str, Any]) -> QuantizedWeight:
        """A :class:`QuantizedWeight` in the RTN weight's storage with the learned codes and scales."""
        stored_dtype = self.qw.codes.dtype
        if self.qw.storage == "lut_dq":  # the table's integers back to their uint4 element codes
            fmt = get_format(self.qw.spec.dtype)
            element = fmt.element if isinstance(fmt, MXFormat) else fmt
            assert isinstance(element, ElementFormat)
            values = (codes / INT_FACTOR[element.name]).astype(np.float32)
            stored = element.encode(values).astype(np.uint8).astype(stored_dtype)
        elif self.qw.storage == "lut":  # HiF8: the learned values back to their uint8 codes (exact: on the grid)
            fmt = get_format(self.qw.spec.dtype)
            assert isinstance(fmt, ElementFormat)
            stored = fmt.encode(codes.astype(np.float32)).astype(stored_dtype)
        elif _storage_is_integer(self.qw.codes):
            stored = np.rint(codes).astype(np.int32).astype(stored_dtype)
        else:
            stored = codes.astype(np.float32).astype(stored_dtype)
        unit = self.unit_scale(log_scale)
        if self.qw.storage == "dq2":  # the scales are not learned: the stored FP8 group and channel scales stay
            scale = np.asarray(self.qw.scale, np.float32)
        else:
            scale = unit if unit.shape == np.shape(self.qw.scale) else unit.reshape(np.shape(self.qw.scale))
        return replace(
            self.qw,
            codes=stored,
            scale=np.asarray(scale, np.float32),
            dequantized=self.dequantize(codes, log_scale),
            algorithm=algorithm,
        )


def _two_level_scale(qw: QuantizedWeight) -> np.ndarray:
    """A two-level weight's effective group scales: FP8 group code x its channel's float32 scale, as DQ computes it."""
    import ml_dtypes

    assert qw.group_scale_codes is not None and qw.axis is not None
    g8 = np.asarray(qw.group_scale_codes).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    view = [1] * g8.ndim
    view[1 if qw.axis == 0 else 0] = -1  # the channel axis: the one beside the reduction (block) axis
    return np.multiply(g8, np.asarray(qw.scale, np.float32).reshape(view), dtype=np.float32)


def grid_weight(w: np.ndarray, qw: QuantizedWeight) -> GridWeight | str:
    """The learnable form of ``qw`` (the RTN quantization of ``w``), or why its storage cannot be learned.

    Storages: DequantizeLinear codes (``dq``); HiF8's uint8 codes + table (``lut``, learned in value
    units); FP4 as uint4 codes + int8 table -> DQ (``lut_dq``, learned as the table's integers);
    two-level FP4 (``dq2``: element integers under FP8 group scales x float32 channel scales,
    learned as the integers with every scale fixed: the group scales must stay FP8).
    """
    lut = qw.storage == "lut"  # HiF8: uint8 codes -> 256-entry table -> * scale; learned in value units
    if not lut and (qw.storage not in ("dq", "lut_dq", "dq2") or qw.zero_point is None):
        return (
            f"storage {qw.storage!r} keeps round-to-nearest (distillation learns DequantizeLinear and table storages)"
        )
    shape = tuple(w.shape)
    grid = code_grid(qw)
    fmt = get_format(qw.spec.dtype)
    element = fmt.element if isinstance(fmt, MXFormat) else fmt
    if lut:
        assert isinstance(fmt, ElementFormat)
        codes = fmt.decode(qw.codes).astype(np.float64)
        zero = np.zeros(shape)
    elif qw.storage == "lut_dq":  # the int8 table's integers: value x factor
        assert isinstance(element, ElementFormat)
        codes = element.decode(np.asarray(qw.codes, np.uint8)).astype(np.float64) * INT_FACTOR[element.name]
        zero = np.zeros(shape)
    else:
        codes = qw.codes.astype(np.float64)
        zero = expand(np.asarray(qw.zero_point).astype(np.float64), qw, shape)
    two_level = qw.storage == "dq2"
    scale0 = (_two_level_scale(qw) if two_level else np.asarray(qw.scale)).astype(np.float64)
    s = expand(scale0, qw, shape)
    check = np.multiply((codes - zero).astype(np.float32), s.astype(np.float32), dtype=np.float32)
    if not np.array_equal(check, qw.dequantized) or not np.isin(codes, grid).all():
        return f"{qw.spec.dtype} storage does not read back as (code - zero point) * scale; kept round-to-nearest"
    c = np.asarray(w, np.float64) / s + zero
    idx = np.clip(np.searchsorted(grid, c, side="right") - 1, 0, len(grid) - 1)
    low = grid[idx]
    high = grid[np.minimum(idx + 1, len(grid) - 1)]
    below = c <= grid[0]
    high = np.where(below | (c == low), low, high)
    low = np.where(below, grid[0], low)
    step = high - low
    frac = np.where(step > 0, (c - low) / np.where(step > 0, step, 1.0), 0.0)
    fixed_scales = isinstance(fmt, MXFormat) or two_level  # powers of two / FP8 group scales
    return GridWeight(qw, low, high, np.clip(frac, 0.0, 1.0), scale0, zero, learn_scale=not fixed_scales, rtn=codes)
