"""IEEE-style minifloats: FP8 E4M3FN, FP8 E5M2, FP4 E2M1 and FP4 E1M2 (spec sections of those names).

One generic codec, parametrised by exponent width, mantissa width, bias and which codes are
special. All four formats have subnormals (exponent field 0) and a sign bit (so a negative zero
code); values are ``(-1)^S * 2^(E - bias) * (1 + M / 2^m)`` for E > 0 and
``(-1)^S * 2^(1 - bias) * M / 2^m`` for E = 0.

Encoding (spec): RNE to the nearest representable value; finite values above the maximum
saturate to +-max (sign kept); values that round below the smallest subnormal become (signed)
zero. NaN/Inf: E4M3FN NaN -> NaN code, +-Inf -> +-448; E5M2 keeps NaN and Inf; FP4 formats
refuse them (FormatError naming the tensor and the first index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxcomp.formats.base import (
    REJECT_CODE,
    ElementFormat,
    Rounding,
    as_float32,
    round_magnitude,
)

__all__ = ["MinifloatFormat"]

Specials = Literal["ieee", "fn", "none"]


@dataclass(frozen=True, eq=False, kw_only=True)
class MinifloatFormat(ElementFormat):
    """Sign + ``exp_bits`` exponent (``bias``) + ``man_bits`` mantissa, with subnormals.

    ``specials``: "ieee" - exponent all ones is Inf (M = 0) or NaN (E5M2); "fn" - only
    S.1111.111 is NaN, no Inf (E4M3FN, spec: Inf saturates to +-448); "none" - every code is a
    finite number (FP4 E2M1/E1M2).
    """

    exp_bits: int
    man_bits: int
    bias: int
    specials: Specials

    @property
    def _emin(self) -> int:
        """Exponent of the smallest normal (also the exponent scale of the subnormals)."""
        return 1 - self.bias

    @property
    def _max_code(self) -> int:
        """Magnitude code of the largest finite value (0x7E for E4M3FN: 448; 0x7B for E5M2)."""
        top = 1 << (self.bits - 1)
        if self.specials == "ieee":
            return (((1 << self.exp_bits) - 1) << self.man_bits) - 1
        if self.specials == "fn":
            return top - 2
        return top - 1

    @property
    def _nan_code(self) -> int:
        """Canonical NaN code (positive sign, all ones): 0x7F for both FP8 formats."""
        return (1 << (self.bits - 1)) - 1

    def _decode_code_table(self) -> np.ndarray:
        """Value of every code from the bit layout (module docstring)."""
        m, all_ones = self.man_bits, (1 << self.exp_bits) - 1
        c = np.arange(1 << self.bits)
        sign = (c >> (self.bits - 1)) & 1
        e_field = (c >> m) & all_ones
        mant = c & ((1 << m) - 1)
        mag = np.where(
            e_field == 0,
            np.ldexp(mant.astype(np.float64), self._emin - m),
            np.ldexp(((1 << m) + mant).astype(np.float64), e_field - self.bias - m),
        )
        if self.specials == "ieee":
            top = e_field == all_ones
            mag[top] = np.where(mant[top] == 0, np.inf, np.nan)
        elif self.specials == "fn":
            mag[(e_field == all_ones) & (mant == (1 << m) - 1)] = np.nan
        return np.where(sign == 1, -mag, mag).astype(np.float32)

    def _encode_direct(self, x: np.ndarray, rounding: Rounding) -> np.ndarray:
        """Arithmetic encoder: scale by the binade's spacing, round, rebuild the code.

        With e = max(floor(log2|x|), emin) the grid spacing is 2^(e - m); n = round(|x| / spacing)
        and the magnitude code is ``(e - emin) * 2^m + n``, which also covers subnormals
        (e = emin, n < 2^m) and the carry into the next binade (n = 2^(m+1)). Saturation is a
        ``min`` with the largest finite code, since codes are monotone in magnitude.
        """
        x = as_float32(x)
        m, emin = self.man_bits, self._emin
        a = np.abs(x.astype(np.float64))
        finite = np.isfinite(a)
        af = np.where(finite, a, 0.0)
        _, exp = np.frexp(af)
        e = np.maximum(np.where(af > 0, exp - 1, emin), emin)
        n = round_magnitude(np.ldexp(af, m - e), rounding)
        mag = np.minimum((e - emin) * (1 << m) + n, self._max_code).astype(np.uint8)
        sign = np.signbit(x).astype(np.uint8) << np.uint8(self.bits - 1)
        codes = mag | sign
        if self.nonfinite == "error":
            codes[~finite] = REJECT_CODE
            return codes
        inf = np.isinf(x)
        inf_mag = self._max_code + 1 if self.specials == "ieee" else self._max_code
        codes[inf] = np.uint8(inf_mag) | sign[inf]
        codes[np.isnan(x)] = self._nan_code
        return codes
