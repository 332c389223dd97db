"""HiFloat8 (HiF8): the spec section "HiFloat8 (HiF8)" and amct.md section 1.

Byte = sign | dot prefix | exponent field | mantissa. The prefix after the sign selects the
exponent width w and mantissa width m (tapered precision):

    prefix 11 -> w=4, m=1, |E| 8..15      prefix 001  -> w=1, m=3, |E| = 1
    prefix 10 -> w=3, m=2, |E| 4..7       prefix 0001 -> w=0, m=3, E = 0
    prefix 01 -> w=2, m=3, |E| 2..3       prefix 0000 -> denormal 2^(M - 23), M = 1..7

The exponent field is sign-magnitude with an implicit leading 1: its first bit is the sign of E,
the other w-1 bits are |E| - 2^(w-1). Normal value (-1)^S * 2^E * (1 + M / 2^m). Specials:
0x00 zero (no -0), 0x80 NaN, 0x6F/0xEF +-Inf (the 1.5 * 2^15 slot).

Encoding (spec): NaN -> 0x80, +-Inf -> 0x6F/0xEF, +-0 -> 0x00; finite |x| >= 2^15 -> +-2^15
(saturate); |x| < 2^-23 -> 0x00 (sign dropped); 2^-23 <= |x| < 2^-22 -> +-2^-22 (both rounding
modes: the underflow rule is stated without a mode); otherwise round to nearest with ties away
from zero ("rna", the default) or ties to the even code ("rne"); a carry may change the dot field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp.formats.base import ElementFormat, Rounding, as_float32, round_magnitude

__all__ = ["HiF8Format"]

# Indexed by the exponent width w = bit_length(|E|) (0..4): mantissa bits and the code bits of
# the dot prefix (after the sign bit).
_MANT_BITS = np.array([3, 3, 3, 2, 1])
_PREFIX = np.array([0x08, 0x10, 0x20, 0x40, 0x60])

_E_MAX = 15  # 2^15 = 32768 is the largest finite value (0x6E)
_DENORMAL_BIAS = 23  # denormal value 2^(M - 23), M = 1..7 -> 2^-22 .. 2^-16
_NAN, _POS_INF, _NEG_INF = 0x80, 0x6F, 0xEF


def _mantissa_bits(e: np.ndarray) -> np.ndarray:
    """Mantissa width of binade 2^e: 3 for |e| <= 3, 2 for 4..7, 1 for 8..15, 0 otherwise."""
    _, w = np.frexp(np.abs(e).astype(np.float64))  # frexp exponent of an integer = bit_length
    return np.where(np.abs(e) <= _E_MAX, _MANT_BITS[np.minimum(w, 4)], 0)


@dataclass(frozen=True, eq=False, kw_only=True)
class HiF8Format(ElementFormat):
    """HiFloat8 codec (module docstring); "rna" is the default rounding, "rne" is optional."""

    def _decode_code_table(self) -> np.ndarray:
        """Value of each of the 256 codes, parsed from the dot-prefix layout."""
        table = np.empty(256, np.float64)
        for code in range(256):
            table[code] = _decode_one(code)
        return table.astype(np.float32)

    def _encode_direct(self, x: np.ndarray, rounding: Rounding) -> np.ndarray:
        """Arithmetic encoder following the spec rules (see module docstring).

        e = floor(log2|x|), m = mantissa width of binade e, n = round(|x| / 2^(e - m)); the value
        n * 2^(e - m) may carry into binade e + 1 and is re-coded there. In the denormal binades
        (one value each, m = 0) a "rne" tie goes to the neighbour with the even code.
        """
        x = as_float32(x)
        a = np.abs(x.astype(np.float64))
        af = np.where(np.isfinite(a), a, 0.0)
        _, exp = np.frexp(af)
        e = np.where(af > 0, exp - 1, -1000)
        m = _mantissa_bits(e)
        q = np.ldexp(af, m - e)
        n = round_magnitude(q, rounding)
        if rounding == "rne":
            # Denormal tie 1.5 * 2^e between codes e+23 and e+24 (0x07 -> 0x7E is also "up").
            tie = (q == 1.5) & (e >= -22) & (e <= -16)
            n = np.where(tie, np.where((e + _DENORMAL_BIAS) % 2 == 0, 1.0, 2.0), n)
        r = np.ldexp(n, e - m)
        r = np.where(e >= _E_MAX, 2.0**_E_MAX, np.minimum(r, 2.0**_E_MAX))
        r = np.where(e == -_DENORMAL_BIAS, 2.0**-22, r)
        r = np.where(e < -_DENORMAL_BIAS, 0.0, r)
        codes = _magnitude_code(r)
        codes |= (np.signbit(x) & (codes != 0)).astype(np.uint8) << np.uint8(7)
        codes[np.isinf(x)] = np.where(np.signbit(x[np.isinf(x)]), _NEG_INF, _POS_INF)
        codes[np.isnan(x)] = _NAN
        return codes


def _magnitude_code(r: np.ndarray) -> np.ndarray:
    """Code (sign 0) of representable magnitudes ``r`` (float64, 0 or 2^-22 .. 2^15)."""
    pos = r > 0
    _, exp = np.frexp(np.where(pos, r, 1.0))
    e = exp - 1
    ae = np.abs(e)
    _, w = np.frexp(ae.astype(np.float64))
    w = np.minimum(w, 4)
    m = _MANT_BITS[w]
    mant = (np.ldexp(np.where(pos, r, 1.0), m - e) - (1 << m)).astype(np.int64)
    exp_field = np.where(
        w >= 1,
        ((e < 0).astype(np.int64) << (m + w - 1)) | ((ae - (1 << np.maximum(w - 1, 0))) << m),
        0,
    )
    normal = _PREFIX[w] | exp_field | mant
    code = np.where(e < -_E_MAX, e + _DENORMAL_BIAS, normal)
    return np.where(pos, code, 0).astype(np.uint8)


def _decode_one(code: int) -> float:
    """Value of one HiF8 code (module docstring layout)."""
    if code == 0x00:
        return 0.0
    if code == _NAN:
        return float("nan")
    if code in (_POS_INF, _NEG_INF):
        return float("inf") if code == _POS_INF else float("-inf")
    sign = -1.0 if code & 0x80 else 1.0
    body = code & 0x7F
    if body < 0x08:  # dot 0000: denormal
        return sign * 2.0 ** (body - _DENORMAL_BIAS)
    w = next(i for i in range(4, -1, -1) if body >= _PREFIX[i])
    m = int(_MANT_BITS[w])
    rest = body - int(_PREFIX[w])  # w exponent bits then m mantissa bits
    mant = rest & ((1 << m) - 1)
    if w == 0:
        e = 0
    else:
        field = rest >> m
        magnitude = (1 << (w - 1)) + (field & ((1 << (w - 1)) - 1))
        e = -magnitude if field >> (w - 1) else magnitude
    return sign * 2.0**e * (1 + mant / 2**m)
