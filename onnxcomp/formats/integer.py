"""Integer formats INT8, UINT8, INT4, UINT4, INT16, UINT16: the spec section "Integer formats".

    q  = clip(RNE(x / scale) + zero_point, qmin, qmax)      (ONNX QuantizeLinear)
    x' = (q - zero_point) * scale                            (ONNX DequantizeLinear)

``x / scale`` is one float32 division and RNE is ``np.rint`` on float32, exactly the arithmetic
of onnxruntime's CPU QuantizeLinear, so codes are bit-identical to ORT (tested). Dequantize
computes ``float32(int32(q) - int32(zp)) * scale`` like ORT's DequantizeLinear. Every step is
exact in float32 for 16-bit codes too (|code| + |zero point| < 2^24).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import EllipsisType
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from onnxcomp.errors import FormatError
from onnxcomp.formats.base import Kind, as_float32, nonfinite_error

__all__ = ["IntegerFormat"]

_TINY = np.finfo(np.float32).tiny
#: Elements per block of :meth:`IntegerFormat.quantize` (a 256 KiB float32 scratch buffer).
_BLOCK = 1 << 16


@dataclass(frozen=True, eq=False, kw_only=True)
class IntegerFormat:
    """A ``bits``-bit two's-complement (``signed``) or unsigned integer grid.

    Codes are held in ``storage_dtype`` (np.int8 / np.uint8 up to 8 bits, 4-bit values
    range-limited; np.int16 / np.uint16 for 16 bits); ONNX packs INT4/UINT4 two per byte
    (:mod:`onnxcomp.formats.packing`).
    """

    name: str
    bits: int
    signed: bool
    onnx_dtype: int | None

    kind: ClassVar[Kind] = "int"

    @property
    def qmin(self) -> int:
        """Smallest code: -2^(bits-1) signed, 0 unsigned (INT8 -128, INT4 -8)."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest code: 2^(bits-1) - 1 signed, 2^bits - 1 unsigned (INT8 127, UINT4 15)."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def storage_dtype(self) -> np.dtype:
        """The narrowest numpy integer holding every code: (u)int8 up to 8 bits (4-bit codes
        range-limited), (u)int16 for 16 bits."""
        if self.bits <= 8:
            return np.dtype(np.int8 if self.signed else np.uint8)
        return np.dtype(np.int16 if self.signed else np.uint16)

    # ----------------------------------------------------------------- checks
    def _scale(self, scale: npt.ArrayLike) -> np.ndarray:
        s = np.asarray(scale, dtype=np.float32)
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise FormatError(f"{self.name}: scale must be finite and > 0, got {s.ravel()[:4]}")
        return s

    def _zero_point(self, zero_point: npt.ArrayLike) -> np.ndarray:
        zp = np.asarray(zero_point)
        if zp.dtype.kind not in "iu" or (zp.size and (int(zp.min()) < self.qmin or int(zp.max()) > self.qmax)):
            raise FormatError(f"{self.name}: zero_point must be integers in [{self.qmin}, {self.qmax}]")
        return zp

    # ----------------------------------------------------------------- codec
    def quantize(
        self,
        x: npt.ArrayLike,
        scale: npt.ArrayLike,
        zero_point: npt.ArrayLike = 0,
        *,
        name: str | None = None,
    ) -> np.ndarray:
        """``clip(RNE(x / scale) + zero_point, qmin, qmax)`` in ``storage_dtype``.

        ``scale``/``zero_point`` broadcast against ``x`` (reshape them for per-axis or
        per-group). NaN/Inf in ``x`` raise FormatError (spec: "NaN or Inf in a weight: error
        naming the tensor").
        """
        x32 = as_float32(x)
        s, zp = self._scale(scale), self._zero_point(zero_point)
        if not np.isfinite(x32).all():
            raise nonfinite_error(self.name, x32, name, "integer formats cannot encode NaN/Inf")
        shape = np.broadcast_shapes(x32.shape, s.shape, zp.shape)
        codes = np.empty(shape, self.storage_dtype)
        if codes.size == 0:
            return codes
        # Block by block along axis 0 through one float32 scratch buffer that stays in cache: the
        # four passes read and write it there, and only the codes are allocated (2x faster on a
        # 5632 x 2048 weight than whole-array temporaries).
        xs, ss = np.broadcast_to(x32, shape), np.broadcast_to(s, shape)
        zs = np.broadcast_to(zp.astype(np.float32), shape) if zp.any() else None
        rows = shape[0] if shape else 1
        per = max(1, _BLOCK // max(1, codes.size // rows))
        scratch = np.empty((min(per, rows), *shape[1:]), np.float32)
        for start in range(0, rows, per):
            part: slice | EllipsisType = slice(start, start + per) if shape else ...
            buf = scratch[: min(per, rows - start)] if shape else scratch
            with np.errstate(over="ignore"):  # |x / scale| beyond float32 -> +-inf, clipped below
                np.divide(xs[part], ss[part], out=buf)
            np.rint(buf, out=buf)
            if zs is not None:  # symmetric formats: a pass fewer (adding 0 changes no code, -0 included)
                np.add(buf, zs[part], out=buf)
            np.clip(buf, self.qmin, self.qmax, out=buf)
            np.copyto(codes[part], buf, casting="unsafe")  # integers in range: exact
        return codes

    def dequantize(self, q: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike = 0) -> np.ndarray:
        """``float32(q - zero_point) * scale`` (ONNX DequantizeLinear), float32."""
        qa = np.asarray(q)
        if qa.dtype.kind not in "iu":
            raise FormatError(f"{self.name}: codes must be an integer array, got {qa.dtype}")
        zp, sc = self._zero_point(zero_point), self._scale(scale)
        out = np.empty(np.broadcast_shapes(qa.shape, zp.shape, sc.shape), np.float32)
        np.subtract(qa, zp, dtype=np.int32, out=out, casting="unsafe")  # exact: |q - zp| < 2^24
        np.multiply(out, sc, out=out)
        return out

    def quantize_dequantize(
        self,
        x: npt.ArrayLike,
        scale: npt.ArrayLike,
        zero_point: npt.ArrayLike = 0,
        *,
        name: str | None = None,
    ) -> np.ndarray:
        """``dequantize(quantize(x, scale, zero_point), scale, zero_point)``."""
        return self.dequantize(self.quantize(x, scale, zero_point, name=name), scale, zero_point)

    # ----------------------------------------------------------------- parameters
    def compute_qparams(
        self,
        lo: npt.ArrayLike,
        hi: npt.ArrayLike,
        symmetric: bool,
        *,
        name: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scale (float32) and zero point (``storage_dtype``) per unit from ranges [lo, hi].

        Spec rules, elementwise over ``lo``/``hi`` (per-tensor: scalars; per-channel: arrays):

        * symmetric: zero_point 0, scale = amax / qmax with amax = max(|lo|, |hi|). Unsigned
          formats have no negative codes, so their symmetric grid is centred on the midpoint
          code: zero_point = 2^(bits-1) (128 / 8 / 32768), scale = amax / (qmax - zero_point)
          (onnxcomp's choice; the spec only defines the signed case);
        * asymmetric: widen to contain 0 (lo' = min(lo, 0), hi' = max(hi, 0)),
          scale = (hi' - lo') / (qmax - qmin), zero_point = clip(RNE(qmin - lo' / scale));
        * an all-zero unit gets scale 1 and zero point 0 (never NaN); a non-zero range whose
          scale underflows float32 gets the smallest normal float32 as scale;
        * NaN/Inf or lo > hi raise FormatError naming ``name``.
        """
        lo64 = np.asarray(lo, dtype=np.float64)
        hi64 = np.asarray(hi, dtype=np.float64)
        what = f" of tensor {name!r}" if name else ""
        if not (np.isfinite(lo64).all() and np.isfinite(hi64).all()):
            raise FormatError(f"{self.name}: the range{what} contains NaN/Inf; cannot pick a scale")
        if (lo64 > hi64).any():
            raise FormatError(f"{self.name}: the range{what} has lo > hi")
        lo0, hi0 = np.broadcast_arrays(np.minimum(lo64, 0.0), np.maximum(hi64, 0.0))
        if symmetric:
            zp = np.full(lo0.shape, 0 if self.signed else 1 << (self.bits - 1), np.float64)
            scale = np.maximum(-lo0, hi0) / (self.qmax - zp)
        else:
            scale = (hi0 - lo0) / (self.qmax - self.qmin)
        empty = (hi0 - lo0) == 0
        scale32 = np.where(empty, 1.0, np.maximum(scale, _TINY)).astype(np.float32)
        if not symmetric:
            zp = np.clip(np.rint(self.qmin - lo0 / scale32.astype(np.float64)), self.qmin, self.qmax)
        zp = np.where(empty, 0, zp)
        return scale32, zp.astype(self.storage_dtype)

    def __repr__(self) -> str:
        return f"IntegerFormat({self.name!r})"
