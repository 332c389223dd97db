"""A block's input quantizer with a learnable clipping range (LSQ-style gradient on its scale).

The deployed model quantizes a static activation with the scale and zero point the emitters derive
from the calibrated range ``(lo, hi)`` (:func:`onnxcomp.quant.emit.activation_qparams`). Learning
a gain ``g = exp(log_gain)`` on that range, ``(g lo, g hi)``, scales the step by ``g`` and keeps the
zero point, so the block learns on exactly what the emitters will write for the learned range.
The gradient is LSQ's (Esser et al. 2020) with the straight-through estimator: inside the
representable interval ``d x'/d log_gain = x' - x`` and ``d x'/d x = 1``; outside it the value is
clipped to ``x' = c s`` (``c`` the extreme code), so ``d x'/d log_gain = x'`` and ``d x'/d x = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxcomp.formats import ElementFormat, IntegerFormat, get_format
from onnxcomp.quant.emit import activation_qparams
from onnxcomp.quant.qparams import dequantize, quantize


@dataclass(frozen=True)
class InputQuantizer:
    """The static per-tensor quantizer of a block's input: format, calibrated range, and whether its range is learned."""

    dtype: str
    lo: float
    hi: float
    symmetric: bool
    learn: bool = False

    def learned_range(self, log_gain: float) -> tuple[float, float]:
        """The range the emitters get for ``log_gain`` (float64 ends, as calibration gives them)."""
        g = math.exp(log_gain)
        return self.lo * g, self.hi * g

    def _qparams(self, log_gain: float) -> tuple[IntegerFormat | ElementFormat, np.ndarray, np.ndarray]:
        fmt = get_format(self.dtype)
        assert isinstance(fmt, (IntegerFormat, ElementFormat))
        lo, hi = self.learned_range(log_gain)
        scale, zp = activation_qparams(self.dtype, lo, hi, self.symmetric)
        return fmt, scale, zp

    def fake(self, x: np.ndarray, log_gain: float = 0.0) -> np.ndarray:
        """What the deployed model computes: dequantize(quantize(x)) with the learned range's qparams."""
        fmt, scale, zp = self._qparams(log_gain)
        return dequantize(fmt, quantize(fmt, np.asarray(x, np.float32), scale, zp), scale, zp)

    def fake_and_grads(self, x: np.ndarray, log_gain: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x', d x'/d x, d x'/d log_gain) elementwise, straight-through inside the representable interval."""
        fmt, scale, zp = self._qparams(log_gain)
        xq = dequantize(fmt, quantize(fmt, np.asarray(x, np.float32), scale, zp), scale, zp)
        if isinstance(fmt, IntegerFormat):
            ends = (np.array([fmt.qmin, fmt.qmax], np.float64) - float(np.asarray(zp).reshape(-1)[0])) * float(scale)
        else:
            ends = np.array([fmt.values[0], fmt.values[-1]], np.float64) * float(scale)
        inside = (x >= ends[0]) & (x <= ends[1])
        d_gain = np.where(inside, xq - x, xq).astype(np.float32)
        return xq, inside.astype(np.float32), d_gain


__all__ = ["InputQuantizer"]
