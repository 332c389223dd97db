"""Every code of every float format against independent decoders (spec bit layouts, ml_dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from fmt_oracle import ELEMENT_FORMATS, ref_table

from onnxcomp.errors import FormatError
from onnxcomp.formats import ElementFormat, get_format


def _element(name: str) -> ElementFormat:
    fmt = get_format(name)
    assert isinstance(fmt, ElementFormat)
    return fmt


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 including the sign of zero and NaN positions."""
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan_a, nan_b = np.isnan(a32), np.isnan(b32)
    return bool(
        np.array_equal(nan_a, nan_b) and np.array_equal(a32[~nan_a].view(np.uint32), b32[~nan_b].view(np.uint32))
    )


@pytest.mark.parametrize("name", ELEMENT_FORMATS)
def test_decode_table_matches_independent_decoder(name: str) -> None:
    fmt = _element(name)
    assert fmt.decode_table.dtype == np.float32
    assert fmt.decode_table.shape == (1 << fmt.bits,)
    assert _same_floats(fmt.decode_table, ref_table(name))
    codes = np.arange(1 << fmt.bits, dtype=np.uint8)
    assert _same_floats(fmt.decode(codes), ref_table(name))
    assert _same_floats(fmt.decode(codes.reshape(-1, 2)).ravel(), ref_table(name))


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("fp8_e4m3", ml_dtypes.float8_e4m3fn),
        ("fp8_e5m2", ml_dtypes.float8_e5m2),
        ("fp4_e2m1", ml_dtypes.float4_e2m1fn),
    ],
)
def test_decode_matches_ml_dtypes(name: str, dtype: type) -> None:
    fmt = _element(name)
    codes = np.arange(1 << fmt.bits, dtype=np.uint8)
    assert _same_floats(fmt.decode(codes), codes.view(dtype).astype(np.float32))


def test_fp4_e1m2_table_is_the_spec_grid() -> None:
    fmt = _element("fp4_e1m2")
    grid = np.arange(8, dtype=np.float32) / 4  # code = 4 * |value|
    assert _same_floats(fmt.decode_table, np.concatenate([grid, -grid]))


def test_fp4_e2m1_table_is_the_spec_list() -> None:
    mags = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    assert _same_floats(_element("fp4_e2m1").decode_table, np.concatenate([mags, -mags]))


def test_hif8_counts_and_specials() -> None:
    fmt = _element("hif8")
    table = fmt.decode_table
    assert table[0x00] == 0 and not np.signbit(table[0x00])
    assert np.isnan(table[0x80]) and np.isnan(table).sum() == 1
    assert table[0x6F] == np.inf and table[0xEF] == -np.inf and np.isinf(table).sum() == 2
    positive = table[(table > 0) & np.isfinite(table)]
    assert positive.size == 126 and np.unique(positive).size == 126
    assert positive.min() == 2.0**-22 and table[0x01] == 2.0**-22
    assert positive.max() == 2.0**15 and table[0x6E] == 2.0**15
    assert table[0x7E] == 2.0**-15 and positive[positive >= 2.0**-15].min() == 2.0**-15
    assert (table == 0).sum() == 1  # no negative zero
    body = np.arange(1, 0x80)
    finite = body[np.isfinite(table[body])]
    assert np.array_equal(table[finite | 0x80], -table[finite])
    assert fmt.values.size == 253 and fmt.max_value == 32768.0


def test_hif8_sorted_listing_amct_1_5() -> None:
    """docs/formats.md#hif8-representable-values: code blocks per binade, in increasing value order."""
    blocks: list[tuple[int, list[int], list[float]]] = []
    blocks += [(e, [e + 23], [1.0]) for e in range(-22, -15)]
    for e, c in zip(range(-15, -7), range(0x7E, 0x6F, -2), strict=True):
        blocks.append((e, [c, c + 1], [1, 1.5]))
    for e, c in zip(range(-7, -3), (0x5C, 0x58, 0x54, 0x50), strict=True):
        blocks.append((e, list(range(c, c + 4)), [1, 1.25, 1.5, 1.75]))
    eighths = [1 + k / 8 for k in range(8)]
    for e, c in zip(range(-3, 4), (0x38, 0x30, 0x18, 0x08, 0x10, 0x20, 0x28), strict=True):
        blocks.append((e, list(range(c, c + 8)), eighths))
    for e, c in zip(range(4, 8), (0x40, 0x44, 0x48, 0x4C), strict=True):
        blocks.append((e, list(range(c, c + 4)), [1, 1.25, 1.5, 1.75]))
    blocks += [(e, [0x60 + 2 * (e - 8), 0x61 + 2 * (e - 8)], [1, 1.5]) for e in range(8, 15)]
    blocks.append((15, [0x6E], [1.0]))
    table = _element("hif8").decode_table
    listed = []
    for e, codes, mants in blocks:
        for code, mant in zip(codes, mants, strict=True):
            assert table[code] == mant * 2.0**e, hex(code)
            listed.append(table[code])
    assert len(listed) == 126 and np.all(np.diff(listed) > 0)
    assert np.array_equal(_element("hif8").values[_element("hif8").values > 0], listed)


@pytest.mark.parametrize("name", ELEMENT_FORMATS)
def test_values_sorted_finite_single_zero(name: str) -> None:
    fmt = _element(name)
    vals = fmt.values
    assert vals.dtype == np.float32 and np.all(np.diff(vals) > 0)
    assert np.isfinite(vals).all() and (vals == 0).sum() == 1 and not np.signbit(vals[vals == 0]).any()
    table = fmt.decode_table
    assert set(vals.tolist()) == set(table[np.isfinite(table)].tolist())
    assert fmt.max_value == vals[-1] == -vals[0]
    expected_max = {"fp8_e4m3": 448, "fp8_e5m2": 57344, "hif8": 32768, "fp4_e2m1": 6, "fp4_e1m2": 1.75}
    assert fmt.max_value == expected_max[name]


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp4_e1m2"])
def test_fp4_decode_rejects_wide_codes(name: str) -> None:
    with pytest.raises(FormatError):
        _element(name).decode(np.array([3, 16], np.uint8))
