"""MXFP8 / MXFP4: padding, block layout, scale rules, NaN policy (docs/formats.md#mxfp8-and-mxfp4-microscaling)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.errors import FormatError
from onnxcomp.formats import ElementFormat, MXFormat, get_format

MX = ["mxfp8", "mxfp4"]


def _mx(name: str) -> MXFormat:
    fmt = get_format(name)
    assert isinstance(fmt, MXFormat)
    return fmt


def _reference_qdq(fmt: MXFormat, x: np.ndarray, rule: str) -> np.ndarray:
    """Straight transcription of the spec formulas, one block at a time (last axis)."""
    elem: ElementFormat = fmt.element
    emax = {"fp8_e4m3": 8, "fp4_e2m1": 2}[elem.name]
    k = x.shape[-1]
    padded = np.zeros((*x.shape[:-1], -(-k // 32) * 32), np.float32)
    padded[..., :k] = x
    out = np.empty_like(padded)
    for idx in np.ndindex(*padded.shape[:-1]):
        for b in range(padded.shape[-1] // 32):
            block = padded[idx][32 * b : 32 * b + 32].astype(np.float64)
            finite = block[np.isfinite(block)]
            amax = np.abs(finite).max() if finite.size else 0.0
            if amax == 0:
                xexp = -127
            else:
                e = int(np.floor(np.log2(amax)))
                e += 1 if rule == "ref" and amax / 2.0**e > 1.75 else 0
                xexp = int(np.clip(e - emax, -127, 127))
            scaled = (block / 2.0**xexp).astype(np.float32)
            out[idx][32 * b : 32 * b + 32] = elem.quantize_dequantize(scaled).astype(np.float64) * 2.0**xexp
    return out[..., :k]


@pytest.mark.parametrize("rule", ["ref", "ocp"])
@pytest.mark.parametrize("k", [1, 33, 64])
@pytest.mark.parametrize("name", MX)
def test_padding_shapes_and_reference(name: str, k: int, rule: str) -> None:
    fmt = _mx(name)
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((3, k)) * rng.choice([1e-3, 1.0, 1e3], size=(3, 1))).astype(np.float32)
    codes, scales = fmt.quantize(x, scale_rule=rule)
    kp = -(-k // 32) * 32
    assert codes.shape == (3, kp) and codes.dtype == np.uint8
    assert scales.shape == (3, kp // 32) and scales.dtype == np.uint8
    deq = fmt.dequantize(codes, scales)
    assert deq.shape == (3, kp) and np.all(deq[:, k:] == 0)
    qdq = fmt.quantize_dequantize(x, scale_rule=rule)
    assert qdq.shape == x.shape and qdq.dtype == np.float32
    assert np.array_equal(qdq, deq[:, :k])
    assert np.array_equal(qdq, _reference_qdq(fmt, x, rule))
    assert np.array_equal(fmt.scale_exponents(x, scale_rule=rule), scales.astype(np.int32) - 127)


@pytest.mark.parametrize("name", MX)
def test_axis_argument_matches_transposed_last_axis(name: str) -> None:
    fmt = _mx(name)
    x = np.random.default_rng(1).standard_normal((40, 3, 5)).astype(np.float32)
    codes, scales = fmt.quantize(x, axis=0)
    assert codes.shape == (64, 3, 5) and scales.shape == (2, 3, 5)
    moved = np.moveaxis(x, 0, -1)
    c_last, s_last = fmt.quantize(moved)
    assert np.array_equal(np.moveaxis(codes, 0, -1), c_last)
    assert np.array_equal(np.moveaxis(scales, 0, -1), s_last)
    assert np.array_equal(fmt.dequantize(codes, scales, axis=0)[:40], fmt.quantize_dequantize(x, axis=0))
    assert np.array_equal(fmt.quantize_dequantize(x, axis=-3), fmt.quantize_dequantize(x, axis=0))
    assert fmt.scale_exponents(x, axis=0).shape == (2, 3, 5)


def test_ref_and_ocp_rules_differ_on_large_mantissa() -> None:
    """amax mantissa > 1.75: the ref rule bumps X (no clipping), OCP clips the block max."""
    for name, amax, ref_out, ocp_out in [("mxfp8", 480.0, 480.0, 448.0), ("mxfp4", 7.5, 8.0, 6.0)]:
        fmt = _mx(name)
        block = np.zeros(32, np.float32)
        block[0] = amax
        ref_x = fmt.scale_exponents(block, scale_rule="ref")
        assert ref_x[0] == fmt.scale_exponents(block, scale_rule="ocp")[0] + 1
        assert fmt.quantize_dequantize(block, scale_rule="ref")[0] == ref_out
        assert fmt.quantize_dequantize(block, scale_rule="ocp")[0] == ocp_out
        block[0] = amax * 0.9  # mantissa <= 1.75: identical
        same_ref, same_ocp = fmt.quantize(block, scale_rule="ref"), fmt.quantize(block, scale_rule="ocp")
        assert np.array_equal(same_ref[1], same_ocp[1])
    with pytest.raises(FormatError, match="scale_rule"):
        _mx("mxfp8").quantize(np.ones(32), scale_rule="floor")  # type: ignore[arg-type]


def test_scale_byte_extremes() -> None:
    fmt = _mx("mxfp8")
    x = np.zeros((4, 32), np.float32)
    x[1, 0] = 2.0**-140  # tiny block: X clips at -127
    x[2, 0] = 2.0e38  # huge block (mantissa 1.18)
    x[3, 0] = -1.0
    _, scales = fmt.quantize(x)
    assert scales[:, 0].tolist() == [0x00, 0x00, 127 + 127 - 8, 127 - 8]


def test_mxfp8_nan_stays_nan_and_inf_saturates() -> None:
    fmt = _mx("mxfp8")
    x = np.linspace(-3, 3, 64, dtype=np.float32)
    x[5] = np.nan
    x[40] = -np.inf
    clean = x.copy()
    clean[[5, 40]] = 0
    codes, scales = fmt.quantize(x)
    assert np.array_equal(scales, fmt.quantize(clean)[1])  # NaN/Inf ignored by amax
    out = fmt.quantize_dequantize(x)
    assert np.isnan(out[5]) and np.isnan(out).sum() == 1
    assert out[40] == -448.0 * 2.0 ** (int(scales[1]) - 127)
    keep = np.ones(64, bool)
    keep[[5, 40]] = False
    assert np.array_equal(out[keep], fmt.quantize_dequantize(clean)[keep])
    assert np.isnan(fmt.dequantize(codes, scales)[5])


def test_mxfp4_rejects_nonfinite() -> None:
    x = np.zeros((2, 40), np.float32)
    x[1, 33] = np.inf
    expected = "mxfp4: 1 non-finite values (first at index (1, 33)); FP4 cannot encode NaN/Inf"
    for call in (_mx("mxfp4").quantize, _mx("mxfp4").quantize_dequantize):
        with pytest.raises(FormatError) as info:
            call(x)
        assert str(info.value) == expected


def test_dequantize_validates_shapes_and_nan_scale() -> None:
    fmt = _mx("mxfp4")
    with pytest.raises(FormatError, match="do not match"):
        fmt.dequantize(np.zeros((2, 33), np.uint8), np.zeros((2, 1), np.uint8))
    with pytest.raises(FormatError, match="do not match"):
        fmt.dequantize(np.zeros((2, 64), np.uint8), np.zeros((2, 1), np.uint8))
    out = fmt.dequantize(np.full((1, 64), 2, np.uint8), np.array([[0xFF, 0x7F]], np.uint8))
    assert np.isnan(out[0, :32]).all() and np.all(out[0, 32:] == 1.0)
    with pytest.raises(FormatError, match="axis"):
        fmt.quantize(np.zeros((2, 3)), axis=2)
