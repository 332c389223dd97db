"""Independent test oracles for onnxcomp.formats, written from the bit layouts of docs/formats.md.

Nothing here imports the implementation's tables: decoders parse bit strings, and the reference
encoder is a brute-force nearest-value search over the decoded values with the spec's tie,
saturation and underflow rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------- decoders

# HiF8 dot prefixes (after the sign bit): (prefix, exponent width w, mantissa bits m);
# w None = denormal (spec table "HiFloat8 (HiF8)").
_HIF8_DOTS = (("11", 4, 1), ("10", 3, 2), ("01", 2, 3), ("001", 1, 3), ("0001", 0, 3), ("0000", None, 3))


def hif8_decode_ref(code: int) -> float:
    """HiF8 value of ``code`` by parsing its bit string (spec: HiFloat8 layout and specials)."""
    specials = {0x00: 0.0, 0x80: float("nan"), 0x6F: float("inf"), 0xEF: float("-inf")}
    if code in specials:
        return specials[code]
    bits = f"{code:08b}"
    sign = -1.0 if bits[0] == "1" else 1.0
    body = bits[1:]
    prefix, w, m = next(d for d in _HIF8_DOTS if body.startswith(d[0]))
    rest = body[len(prefix) :]
    assert len(rest) == (w or 0) + m or w is None
    if w is None:  # denormal: 2^(M - 23)
        return sign * 2.0 ** (int(rest, 2) - 23)
    exp_bits, mant_bits = rest[:w], rest[w:]
    if w == 0:
        e = 0
    else:
        magnitude = 2 ** (w - 1) + (int(exp_bits[1:], 2) if w > 1 else 0)
        e = -magnitude if exp_bits[0] == "1" else magnitude
    return sign * 2.0**e * (1 + int(mant_bits, 2) / 2**m)


@dataclass(frozen=True)
class MinifloatSpec:
    """Spec parameters of an IEEE-style minifloat."""

    exp_bits: int
    man_bits: int
    bias: int
    specials: str  # "ieee" | "fn" | "none"

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits


MINIFLOATS = {
    "fp8_e4m3": MinifloatSpec(4, 3, 7, "fn"),
    "fp8_e5m2": MinifloatSpec(5, 2, 15, "ieee"),
    "fp4_e2m1": MinifloatSpec(2, 1, 1, "none"),
    "fp4_e1m2": MinifloatSpec(1, 2, 1, "none"),
}


def minifloat_decode_ref(spec: MinifloatSpec, code: int) -> float:
    """Value of ``code`` from the sign/exponent/mantissa bit string."""
    bits = f"{code:0{spec.bits}b}"
    sign = -1.0 if bits[0] == "1" else 1.0
    e_str, m_str = bits[1 : 1 + spec.exp_bits], bits[1 + spec.exp_bits :]
    e, m = int(e_str, 2), int(m_str, 2)
    if spec.specials == "ieee" and e_str == "1" * spec.exp_bits:
        return sign * float("inf") if m == 0 else float("nan")
    if spec.specials == "fn" and e_str == "1" * spec.exp_bits and m_str == "1" * spec.man_bits:
        return float("nan")
    if e == 0:
        return sign * (m / 2**spec.man_bits) * 2.0 ** (1 - spec.bias)
    return sign * (1 + m / 2**spec.man_bits) * 2.0 ** (e - spec.bias)


def decode_ref(fmt_name: str, code: int) -> float:
    if fmt_name == "hif8":
        return hif8_decode_ref(code)
    return minifloat_decode_ref(MINIFLOATS[fmt_name], code)


def ref_table(fmt_name: str) -> np.ndarray:
    """float64 value of every code according to the independent decoders."""
    bits = 8 if fmt_name == "hif8" else MINIFLOATS[fmt_name].bits
    return np.array([decode_ref(fmt_name, c) for c in range(1 << bits)], dtype=np.float64)


# ----------------------------------------------------------------------------- encoder

ELEMENT_FORMATS = ["fp8_e4m3", "fp8_e5m2", "hif8", "fp4_e2m1", "fp4_e1m2"]
ROUNDINGS = {"hif8": ["rna", "rne"]}


def encode_ref(fmt_name: str, x: np.ndarray, rounding: str) -> np.ndarray:
    """Brute-force nearest-value encoder (codes as int64; -1 where the format raises).

    Finite |x| above the max saturates; ties: "rna" -> larger magnitude, "rne" -> even code.
    HiF8: no -0 (sign kept only on non-zero codes), |x| < 2^-23 -> 0 and
    2^-23 <= |x| < 2^-22 -> 2^-22 in both modes (spec underflow rule), NaN -> 0x80,
    Inf -> 0x6F/0xEF. FP8: sign kept on zero (IEEE), NaN -> 0x7F, E4M3 Inf -> +-448,
    E5M2 Inf -> Inf code. FP4: NaN/Inf -> -1 (FormatError).
    """
    table = ref_table(fmt_name)
    bits = 8 if fmt_name == "hif8" else MINIFLOATS[fmt_name].bits
    sign_bit = 1 << (bits - 1)
    pos_codes = np.array([c for c in range(sign_bit) if np.isfinite(table[c])])
    order = np.argsort(table[pos_codes], kind="stable")
    mags, mag_codes = table[pos_codes][order], pos_codes[order]
    assert np.all(np.diff(mags) > 0), "magnitudes must be distinct"

    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        a = np.abs(x.astype(np.float64))
    fin = np.isfinite(a)
    af = np.where(fin, a, 0.0)
    i = np.clip(np.searchsorted(mags, af, side="left"), 1, len(mags) - 1)
    lo, hi = mags[i - 1], mags[i]
    c_lo, c_hi = mag_codes[i - 1], mag_codes[i]
    twice = 2 * af
    mid = lo + hi
    if rounding == "rna":
        tie_code = c_hi
    else:
        tie_code = np.where(c_lo % 2 == 0, c_lo, c_hi)
    code = np.where(twice < mid, c_lo, np.where(twice > mid, c_hi, tie_code))
    code = np.where(af <= lo, c_lo, code)
    code = np.where(af >= mags[-1], mag_codes[-1], code)  # saturation
    neg = np.signbit(x)
    if fmt_name == "hif8":
        code = np.where((af >= 2.0**-23) & (af < 2.0**-22), 0x01, code)
        code = np.where(af < 2.0**-23, 0x00, code)
        code = np.where(neg & (code != 0), code | 0x80, code)
        code = np.where(np.isinf(x), np.where(neg, 0xEF, 0x6F), code)
        code = np.where(np.isnan(x), 0x80, code)
        return code.astype(np.int64)
    code = np.where(neg, code | sign_bit, code)
    spec = MINIFLOATS[fmt_name]
    if spec.specials == "none":
        return np.where(fin, code, -1).astype(np.int64)
    inf_code = mag_codes[-1] + 1 if spec.specials == "ieee" else mag_codes[-1]
    code = np.where(np.isinf(x), np.where(neg, inf_code | sign_bit, inf_code), code)
    code = np.where(np.isnan(x), sign_bit - 1, code)
    return code.astype(np.int64)


def fp16_patterns() -> np.ndarray:
    """All 65536 float16 bit patterns as float32 (NaN, Inf, subnormals included)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def bf16_patterns() -> np.ndarray:
    """All 65536 bfloat16 bit patterns as float32."""
    return (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)


def random_float32_patterns(n: int, seed: int = 0) -> np.ndarray:
    """``n`` uniformly random float32 bit patterns (every exponent, random low bits)."""
    bits = np.random.default_rng(seed).integers(0, 1 << 32, n, dtype=np.uint64)
    return bits.astype(np.uint32).view(np.float32)


def random_float32_near_one(n: int, seed: int = 0, max_exp: int = 24) -> np.ndarray:
    """``n`` float32 values with random sign and mantissa bits and exponents in
    [-max_exp - 8, max_exp) (the range the 8-/4-bit formats care about, incl. under/overflow)."""
    rng = np.random.default_rng(seed)
    sign = rng.integers(0, 2, n, dtype=np.uint32) << 31
    exp = rng.integers(127 - max_exp - 8, 127 + max_exp, n, dtype=np.uint32) << 23
    mant = rng.integers(0, 1 << 23, n, dtype=np.uint32)
    return (sign | exp | mant).view(np.float32)


def midpoints_and_neighbours(values: np.ndarray) -> np.ndarray:
    """Every midpoint between adjacent ``values`` (exact in float32 here) and the float32 values
    one ulp either side, both signs: the inputs where tie rules decide."""
    v = np.asarray(values, np.float64)
    mid = ((v[:-1] + v[1:]) / 2).astype(np.float32)
    assert np.array_equal(mid.astype(np.float64), (v[:-1] + v[1:]) / 2), "midpoints not exact"
    pts = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))])
    return np.concatenate([pts, -pts, np.asarray(values, np.float32)])
