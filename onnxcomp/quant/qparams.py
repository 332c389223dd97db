"""Range -> (scale, zero point) -> codes, for any integer or element float format.

The one place where symmetric/affine parameter math meets the codecs, shared by weights,
activations and the observers' error searches.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.formats import ElementFormat, IntegerFormat, get_format

_TINY = np.float32(np.finfo(np.float32).tiny)
#: Where the amax rule puts the largest value. HiF8 (tapered precision): 16, the top of the
#: 3-mantissa-bit region, as the reference tools do; other formats: their largest value.
SCALE_TARGET = {"hif8": 16.0}


def scale_target(fmt: ElementFormat) -> float:
    return SCALE_TARGET.get(fmt.name, float(fmt.max_value))


def qparams_for_range(
    fmt: IntegerFormat | ElementFormat, lo: np.ndarray | float, hi: np.ndarray | float, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scale, zero point codes) per unit. Float formats: scale = amax / target, zp 0."""
    if isinstance(fmt, IntegerFormat):
        return fmt.compute_qparams(lo, hi, symmetric)
    amax = np.maximum(np.abs(np.asarray(lo, np.float64)), np.abs(np.asarray(hi, np.float64)))
    scale = np.where(amax > 0, amax / scale_target(fmt), 1.0).astype(np.float32)
    scale = np.maximum(scale, _TINY)
    return scale, np.zeros(scale.shape, np.uint8)


def quantize(fmt: IntegerFormat | ElementFormat, x: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """Codes of ``x`` (ONNX QuantizeLinear arithmetic: x / scale in float32, then the format's rounding)."""
    if isinstance(fmt, IntegerFormat):
        return fmt.quantize(x, scale, zp)
    return fmt.encode(np.divide(np.asarray(x, np.float32), scale))


def dequantize(fmt: IntegerFormat | ElementFormat, codes: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """Exactly what DequantizeLinear computes: float32(code - zp) * scale."""
    if isinstance(fmt, IntegerFormat):
        return fmt.dequantize(codes, scale, zp)
    return np.multiply(fmt.decode(codes), scale, dtype=np.float32)


class RangeQDQ:
    """``qdq(values, lo, hi)`` for the observers' error-based range searches: the values
    quantized and dequantized on the grid of [lo, hi] (lo/hi may be (C, 1) columns: C rows).

    For integer formats it also gives the grids themselves (:meth:`integer_grid`), with which the
    searches compute every candidate's error in place, in one float32 buffer, instead of through
    the codes array and its copies (the arithmetic of ``quantize`` + ``dequantize``, the same
    floats: ``onnxcomp.calibration.error_search``)."""

    def __init__(self, dtype: str, symmetric: bool) -> None:
        self.fmt = get_format(dtype)
        self.dtype = dtype
        self.symmetric = symmetric

    def __call__(self, values: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
        fmt = self.fmt
        # Static activation formats are integer or element formats (spec validation makes MX dynamic).
        assert isinstance(fmt, (IntegerFormat, ElementFormat)), f"no static range quantization for {self.dtype}"
        scale, zp = qparams_for_range(fmt, lo, hi, self.symmetric)
        return dequantize(fmt, quantize(fmt, values, scale, zp), scale, zp).astype(np.float64)

    def integer_grid(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float] | None:
        """(float32 scales, float32 zero points, qmin, qmax) of the candidates [lo[c], hi[c]],
        or None for a non-integer format. ``x -> (clip(rint(x / s) + z, qmin, qmax) - z) * s`` in
        float32 is then exactly ``dequantize(quantize(x))``: every step is exact or rounds once
        as the codec does (codes and zero points are integers below 2^24)."""
        if not isinstance(self.fmt, IntegerFormat):
            return None
        scale, zp = self.fmt.compute_qparams(lo, hi, self.symmetric)
        return (
            np.asarray(scale, np.float32),
            np.asarray(zp).astype(np.float32),
            float(self.fmt.qmin),
            float(self.fmt.qmax),
        )


def range_qdq(dtype: str, symmetric: bool) -> RangeQDQ:
    """A ``qdq(values, lo, hi)`` callable for the observers' error-based range searches."""
    return RangeQDQ(dtype, symmetric)
