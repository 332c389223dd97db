"""Encode on every float16 and bfloat16 pattern (and random float32 patterns) against the
brute-force nearest-value oracle, plus the NaN/Inf policy and ml_dtypes parity (spec rules)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from fmt_oracle import (
    ELEMENT_FORMATS,
    ROUNDINGS,
    bf16_patterns,
    encode_ref,
    fp16_patterns,
    midpoints_and_neighbours,
    random_float32_near_one,
    random_float32_patterns,
)

from onnxcomp.errors import FormatError
from onnxcomp.formats import ElementFormat, get_format

CASES = [(n, r) for n in ELEMENT_FORMATS for r in ROUNDINGS.get(n, ["rne"])]
PATTERNS = {
    "fp16": fp16_patterns,
    "bf16": bf16_patterns,
    "f32": lambda: random_float32_patterns(1 << 17),
    "f32_near_one": lambda: random_float32_near_one(1 << 18),
}
REJECTS_NONFINITE = {"fp4_e2m1", "fp4_e1m2"}


def _element(name: str) -> ElementFormat:
    fmt = get_format(name)
    assert isinstance(fmt, ElementFormat)
    return fmt


def _hex_mismatches(x: np.ndarray, got: np.ndarray, want: np.ndarray) -> list[str]:
    bad = np.flatnonzero(got != want)[:5]
    return [f"{x[i]!r} ({x.view(np.uint32)[i]:#010x}): got {got[i]:#04x} want {want[i]:#04x}" for i in bad]


@pytest.mark.parametrize("patterns", list(PATTERNS))
@pytest.mark.parametrize(("name", "rounding"), CASES)
def test_encode_matches_nearest_value_oracle(name: str, rounding: str, patterns: str) -> None:
    fmt = _element(name)
    x = PATTERNS[patterns]()
    if patterns == "fp16":
        x = np.concatenate([x, midpoints_and_neighbours(fmt.values)])
    want = encode_ref(name, x, rounding)
    if name in REJECTS_NONFINITE:
        x = x[want >= 0]
        want = want[want >= 0]
    got = fmt.encode(x, rounding).astype(np.int64)
    assert np.array_equal(got, want), _hex_mismatches(x, got, want)
    # the fused quantize-dequantize path is bit-identical to decode(encode(x))
    qdq = fmt.quantize_dequantize(x, rounding)
    dec = fmt.decode(got.astype(np.uint8))
    assert np.array_equal(qdq.view(np.uint32), dec.view(np.uint32))


@pytest.mark.parametrize(("name", "rounding"), CASES)
def test_fast_path_equals_direct_arithmetic(name: str, rounding: str) -> None:
    """The 65536-entry tables agree with the arithmetic encoder on arbitrary float32 bits."""
    fmt = _element(name)
    x = np.concatenate([random_float32_patterns(1 << 16, seed=1), random_float32_near_one(1 << 16, seed=2)])
    if name in REJECTS_NONFINITE:
        x = x[np.isfinite(x)]
    with np.errstate(invalid="ignore"):
        direct = fmt._encode_direct(x, rounding)  # noqa: SLF001 - white-box check
    assert np.array_equal(fmt.encode(x, rounding), direct)


def test_low_bit_nan_payloads_stay_nan() -> None:
    """NaNs whose payload is only in the 16 dropped bits must not look like Inf."""
    nan_bits = np.array([0x7F800001, 0xFF800001, 0x7F80FFFF, 0x7FC00000, 0xFFFFFFFF], np.uint32)
    x = np.concatenate([nan_bits.view(np.float32), np.ones(1 << 17, np.float32)])
    for name, nan_code in [("hif8", 0x80), ("fp8_e4m3", 0x7F), ("fp8_e5m2", 0x7F)]:
        fmt = _element(name)
        for rounding in fmt.roundings:
            assert np.all(fmt.encode(x, rounding)[:5] == nan_code), (name, rounding)
            assert np.isnan(fmt.quantize_dequantize(x, rounding)[:5]).all()
            y = x.copy()
            fmt._qdq_into(y, y, rounding, None)  # noqa: SLF001 - in-place path used by MX
            assert np.isnan(y[:5]).all() and np.all(y[5:] == 1)


@pytest.mark.parametrize(
    ("name", "nan", "pos_inf", "neg_inf", "big", "neg_big"),
    [
        ("hif8", 0x80, 0x6F, 0xEF, 0x6E, 0xEE),
        ("fp8_e4m3", 0x7F, 0x7E, 0xFE, 0x7E, 0xFE),
        ("fp8_e5m2", 0x7F, 0x7C, 0xFC, 0x7B, 0xFB),
    ],
)
def test_nan_inf_policy(name: str, nan: int, pos_inf: int, neg_inf: int, big: int, neg_big: int) -> None:
    fmt = _element(name)
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 1e30, -1e30, 3.4e38], np.float32)
    assert fmt.encode(x).tolist() == [nan, nan, pos_inf, neg_inf, big, neg_big, big]
    out = fmt.quantize_dequantize(x)
    assert np.isnan(out[:2]).all()
    assert out[4] == fmt.max_value and out[5] == -fmt.max_value


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp4_e1m2"])
def test_fp4_rejects_nonfinite_with_count_and_index(name: str) -> None:
    fmt = _element(name)
    x = np.zeros((2, 20), np.float32)
    x[0, 17], x[1, 3], x[1, 4] = np.nan, np.inf, -np.inf
    expected = f"{name}: 3 non-finite values (first at index (0, 17)); FP4 cannot encode NaN/Inf"
    for call in (fmt.encode, fmt.quantize_dequantize):
        with pytest.raises(FormatError) as info:
            call(x)
        assert str(info.value) == expected
    with pytest.raises(FormatError, match="in tensor 'w'"):
        fmt.encode(x, name="w")
    big = np.zeros(300_000, np.float32)
    big[-1] = np.nan  # in the last chunk
    with pytest.raises(FormatError, match=r"1 non-finite values \(first at index \(299999,\)\)"):
        fmt.encode(big)
    assert fmt.encode(np.array([1e30, -1e30], np.float32)).tolist() == [7, 15]


@pytest.mark.parametrize(
    ("name", "dtype", "clip"),
    [
        ("fp8_e4m3", ml_dtypes.float8_e4m3fn, 448.0),
        ("fp8_e5m2", ml_dtypes.float8_e5m2, 57344.0),
        ("fp4_e2m1", ml_dtypes.float4_e2m1fn, 6.0),
    ],
)
def test_ml_dtypes_parity_in_range(name: str, dtype: type, clip: float) -> None:
    """ml_dtypes is the spec's oracle for in-range values (its casts do not saturate: clip first)."""
    fmt = _element(name)
    rng = np.random.default_rng(7)
    x = np.concatenate(
        [
            bf16_patterns(),
            fp16_patterns(),
            random_float32_patterns(1 << 16, seed=3),
            (rng.standard_normal(1 << 16) * clip / 4).astype(np.float32),
        ]
    )
    x = np.clip(x[np.isfinite(x)], -clip, clip)
    want = x.astype(dtype).view(np.uint8)
    assert np.array_equal(fmt.encode(x), want)
