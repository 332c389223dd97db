"""Microscaling formats MXFP8 and MXFP4: ``docs/formats.md#mxfp8-and-mxfp4-microscaling``.

A block of 32 consecutive elements along ``axis`` shares one scale 2^X stored as the E8M0 byte
X + 127; elements are FP8 E4M3FN (MXFP8) or FP4 E2M1 (MXFP4)::

    amax = max |x| in the block
    e    = floor(log2(amax)); e += 1 if amax / 2^e > 1.75      ("ref" rule; "ocp" omits the +1)
    X    = clip(e - emax_elem, -127, 127)                     emax_elem = 8 (E4M3), 2 (E2M1)
    element = cast_elem(x / 2^X)  (RNE, saturating);   x' = 2^X * element

An all-zero block gets X = -127 (byte 0x00). X is also capped where 2^X * element max would
overflow float32 (see ``_max_exponent``; only blocks with amax near 3.4e38). An axis that is not a
multiple of 32 is zero-padded.
NaN/Inf: MXFP4 refuses them (FormatError); in MXFP8 NaN elements stay NaN and are ignored by
amax, and an infinite element is ignored by amax too and saturates to +-448 * 2^X like FP8 E4M3FN
(onnxcomp's choice; the spec is silent on Inf in MXFP8).

Scaling by 2^-X and 2^X is a float32 multiply by a power of two: exact here, because a product can
only fall into the float32 subnormal range for elements far below the smallest element value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt

from onnxcomp.errors import FormatError
from onnxcomp.formats.base import (
    CHUNK,
    ElementFormat,
    Kind,
    as_float32,
    nonfinite_error,
)

__all__ = ["MXFormat", "ScaleRule"]

ScaleRule = Literal["ref", "ocp"]

_E8M0_BIAS = 127
_E8M0_NAN = 0xFF


@dataclass(frozen=True, eq=False, kw_only=True)
class MXFormat:
    """MX block format: ``element`` codes plus one E8M0 scale byte per ``block_size`` block."""

    name: str
    element: ElementFormat
    emax_elem: int
    block_size: int = 32

    kind: ClassVar[Kind] = "mx"
    onnx_dtype: ClassVar[int | None] = None

    @property
    def bits(self) -> int:
        """Bits per element code (8 for MXFP8, 4 for MXFP4; the shared scale is extra)."""
        return self.element.bits

    @property
    def _max_exponent(self) -> int:
        """Largest X whose block maximum (max element * 2^X) is finite in float32.

        The spec clips X to 127; with the ref rule a block max within ~6% of the float32 maximum
        would otherwise decode to Inf (e.g. 3.3e38 -> X = 120 -> 288 * 2^120). Only blocks with
        amax > 1.9e38 (MXFP8) / 2.5e38 (MXFP4) are affected.
        """
        return int(np.floor(np.log2(np.finfo(np.float32).max / self.element.max_value)))

    # ----------------------------------------------------------------- layout helpers
    def _blocked(self, x32: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
        """Contiguous zero-padded copy of ``x32`` with ``axis`` moved last; original length."""
        moved = np.moveaxis(x32, axis, -1)
        k = moved.shape[-1]
        padded_len = -(-k // self.block_size) * self.block_size
        if padded_len == k:
            return np.array(moved, dtype=np.float32, order="C"), k
        xp = np.zeros((*moved.shape[:-1], padded_len), np.float32)
        xp[..., :k] = moved
        return xp, k

    def _check_axis(self, ndim: int, axis: int) -> int:
        if not -ndim <= axis < ndim:
            raise FormatError(f"{self.name}: axis {axis} out of range for a {ndim}-D tensor")
        return axis % ndim

    def _exponents_of(self, blocks: np.ndarray, scale_rule: str) -> np.ndarray:
        """Shared exponent X (int32) of each row of ``blocks`` (rows, block_size)."""
        if scale_rule not in ("ref", "ocp"):
            raise FormatError(f"{self.name}: unknown scale_rule {scale_rule!r}; use 'ref' or 'ocp'")
        amax = np.empty(blocks.shape[0], np.float32)
        rows = max(1, CHUNK // self.block_size)
        buf = np.empty((min(rows, blocks.shape[0]), self.block_size), np.float32)
        for start in range(0, blocks.shape[0], rows):
            chunk = blocks[start : start + rows]
            absval = buf[: chunk.shape[0]]
            np.abs(chunk, out=absval)
            np.fmax.reduce(absval, axis=-1, out=amax[start : start + rows])  # fmax skips NaN
        bad = ~np.isfinite(amax)
        if bad.any():  # an Inf element: amax over the finite elements only (module docstring)
            sub = blocks[bad]
            amax[bad] = np.where(np.isfinite(sub), np.abs(sub), 0).max(axis=-1)
        mant, exp = np.frexp(amax)  # amax = mant * 2^exp, mant in [0.5, 1)
        e = exp.astype(np.int32) - 1
        if scale_rule == "ref":
            e += (mant > 0.875).astype(np.int32)  # amax / 2^e = 2 * mant > 1.75
        x = np.clip(e - self.emax_elem, -_E8M0_BIAS, self._max_exponent)
        return np.where(amax == 0, -_E8M0_BIAS, x).astype(np.int32)

    def _prepare(
        self, x: npt.ArrayLike, axis: int, scale_rule: str, name: str | None
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Padded blocks scaled by 2^-X in place: (xp, X, axis, original length)."""
        x32 = as_float32(x)
        if x32.ndim == 0:
            raise FormatError(f"{self.name}: needs at least a 1-D tensor")
        axis = self._check_axis(x32.ndim, axis)
        if self.element.nonfinite == "error" and not np.isfinite(x32).all():
            raise nonfinite_error(self.name, x32, name, "FP4 cannot encode NaN/Inf")
        xp, k = self._blocked(x32, axis)
        blocks = xp.reshape(-1, self.block_size)
        exps = self._exponents_of(blocks, scale_rule)
        np.multiply(blocks, np.ldexp(np.float32(1), -exps)[:, None], out=blocks)
        return xp, exps.reshape(xp.shape[:-1] + (-1,)), axis, k

    # ----------------------------------------------------------------- public codec
    def scale_exponents(self, x: npt.ArrayLike, axis: int = -1, scale_rule: ScaleRule = "ref") -> np.ndarray:
        """Shared exponent X (int32) per block; ``axis`` is replaced by the block count.

        The E8M0 byte is X + 127; a graph emitter stores the float32 scale 2^X.
        """
        x32 = as_float32(x)
        axis = self._check_axis(x32.ndim, axis)
        xp, _ = self._blocked(x32, axis)
        exps = self._exponents_of(xp.reshape(-1, self.block_size), scale_rule)
        return np.moveaxis(exps.reshape(xp.shape[:-1] + (-1,)), -1, axis)

    def quantize(
        self,
        x: npt.ArrayLike,
        axis: int = -1,
        scale_rule: ScaleRule = "ref",
        *,
        name: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Element codes (uint8, ``x``'s shape with ``axis`` padded to a multiple of 32) and
        E8M0 scale bytes (uint8, ``axis`` length divided by 32)."""
        xp, exps, axis, _ = self._prepare(x, axis, scale_rule, name)
        codes = np.empty(xp.shape, np.uint8)
        self.element._encode_into(xp, codes, self.element.default_rounding, name)
        scale_bytes = (exps + _E8M0_BIAS).astype(np.uint8)
        return (
            np.ascontiguousarray(np.moveaxis(codes, -1, axis)),
            np.ascontiguousarray(np.moveaxis(scale_bytes, -1, axis)),
        )

    def dequantize(self, codes: npt.ArrayLike, scale_bytes: npt.ArrayLike, axis: int = -1) -> np.ndarray:
        """``2^(byte - 127) * decode(code)`` per element, float32, padded shape (caller trims).

        Scale byte 0xFF (E8M0 NaN) decodes its whole block to NaN.
        """
        c = np.asarray(codes)
        sb = np.asarray(scale_bytes)
        axis = self._check_axis(c.ndim, axis)
        expected = list(c.shape)
        expected[axis] //= self.block_size
        if c.shape[axis] % self.block_size or list(sb.shape) != expected:
            raise FormatError(
                f"{self.name}: codes {c.shape} and scale bytes {sb.shape} do not match blocks of "
                f"{self.block_size} along axis {axis}"
            )
        vals = self.element.decode(np.moveaxis(c, axis, -1))
        sbm = np.moveaxis(sb, axis, -1).reshape(-1)
        nan_scale = sbm == _E8M0_NAN
        factor = np.ldexp(np.float32(1), np.where(nan_scale, 0, sbm.astype(np.int32) - _E8M0_BIAS))
        factor[nan_scale] = np.nan
        blocks = vals.reshape(-1, self.block_size)
        np.multiply(blocks, factor[:, None], out=blocks)
        return np.ascontiguousarray(np.moveaxis(vals, -1, axis))

    def quantize_dequantize(
        self,
        x: npt.ArrayLike,
        axis: int = -1,
        scale_rule: ScaleRule = "ref",
        *,
        name: str | None = None,
    ) -> np.ndarray:
        """``x'`` with ``x``'s shape (padding is internal and trimmed), float32."""
        xp, exps, axis, k = self._prepare(x, axis, scale_rule, name)
        self.element._qdq_into(xp, xp, self.element.default_rounding, name)
        blocks = xp.reshape(-1, self.block_size)
        np.multiply(blocks, np.ldexp(np.float32(1), exps.reshape(-1))[:, None], out=blocks)
        return np.ascontiguousarray(np.moveaxis(xp[..., :k], -1, axis))

    def __repr__(self) -> str:
        return f"MXFormat({self.name!r})"
