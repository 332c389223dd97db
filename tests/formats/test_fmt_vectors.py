"""Every test vector of docs/formats.md, verbatim (docs/formats.md#test-vector-index), incl. the AMCT HiF8 vectors."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.formats import ElementFormat, IntegerFormat, MXFormat, get_format

# formats.md, HiFloat8 "Test vectors (input -> code -> decoded)"
SPEC_HIF8 = [
    (1.0, 0x08, 1.0),
    (-1.0, 0x88, -1.0),
    (1.0625, 0x09, 1.125),
    (1.9375, 0x10, 2.0),
    (3.3, 0x15, 3.25),
    (-3.3, 0x95, -3.25),
    (7.5, 0x27, 7.5),
    (15.5, 0x40, 16.0),
    (17.0, 0x40, 16.0),
    (100.0, 0x4A, 96.0),
    (255.0, 0x60, 256.0),
    (28672.0, 0x6E, 32768.0),
    (65504.0, 0x6E, 32768.0),
    (0.1, 0x52, 0.09375),
    (0.001, 0x74, 0.0009765625),
    (2e-5, 0x07, 2.0**-16),
    (1.5 * 2.0**-22, 0x02, 2.0**-21),
    (2.0**-23, 0x01, 2.0**-22),
    (1e-8, 0x00, 0.0),
    (-5e-9, 0x00, 0.0),
]

# docs/formats.md#hif8-reference-vectors-amct (checked there against both C++ implementations)
AMCT_HIF8 = [
    (0.0, 0x00, 0.0),
    (-0.0, 0x00, 0.0),
    (1.0, 0x08, 1.0),
    (-1.0, 0x88, -1.0),
    (1.0625, 0x09, 1.125),
    (1.1, 0x09, 1.125),
    (1.9375, 0x10, 2.0),
    (3.0, 0x14, 3.0),
    (3.3, 0x15, 3.25),
    (-3.3, 0x95, -3.25),
    (7.5, 0x27, 7.5),
    (15.0, 0x2F, 15.0),
    (15.5, 0x40, 16.0),
    (17.0, 0x40, 16.0),
    (20.0, 0x41, 20.0),
    (100.0, 0x4A, 96.0),
    (255.0, 0x60, 256.0),
    (1000.0, 0x64, 1024.0),
    (24576.0, 0x6D, 24576.0),
    (28672.0, 0x6E, 32768.0),
    (40000.0, 0x6E, 32768.0),
    (65504.0, 0x6E, 32768.0),
    (0.3, 0x32, 0.3125),
    (0.1, 0x52, 0.09375),
    (0.01, 0x5D, 0.009765625),
    (0.001, 0x74, 0.0009765625),
    (-0.0078125, 0xDC, -(2.0**-7)),
    (3.0517578125e-5, 0x7E, 2.0**-15),
    (2.718e-5, 0x7E, 2.0**-15),
    (2e-5, 0x07, 2.0**-16),
    (5e-6, 0x05, 2.0**-18),
    (3.5762786865234375e-7, 0x02, 2.0**-21),
    (2.384185791015625e-7, 0x01, 2.0**-22),
    (1.2e-7, 0x01, 2.0**-22),
    (1.1920928955078125e-7, 0x01, 2.0**-22),
    (1e-8, 0x00, 0.0),
    (-5e-9, 0x00, 0.0),
    (np.inf, 0x6F, np.inf),
    (-np.inf, 0xEF, -np.inf),
]

# formats.md, "Worked decodes"
SPEC_HIF8_DECODES = [
    (0x2A, 10.0),
    (0x5D, 0.009765625),
    (0x18, 0.5),
    (0x40, 16.0),
    (0x60, 256.0),
    (0x4A, 96.0),
    (0x6D, 24576.0),
    (0x7E, 2.0**-15),
]


def _hif8() -> ElementFormat:
    fmt = get_format("hif8")
    assert isinstance(fmt, ElementFormat)
    return fmt


@pytest.mark.parametrize(("x", "code", "decoded"), SPEC_HIF8 + AMCT_HIF8)
def test_hif8_vector(x: float, code: int, decoded: float) -> None:
    fmt = _hif8()
    got = fmt.encode(np.array([x], np.float32))
    assert got[0] == code, f"{x}: {got[0]:#04x} != {code:#04x}"
    assert fmt.decode(got)[0] == np.float32(decoded)
    assert fmt.quantize_dequantize(np.array([x], np.float32))[0] == np.float32(decoded)


def test_hif8_nan_vector() -> None:
    fmt = _hif8()
    assert fmt.encode(np.array([np.nan], np.float32))[0] == 0x80
    assert np.isnan(fmt.decode(np.array([0x80], np.uint8))[0])


@pytest.mark.parametrize(("code", "value"), SPEC_HIF8_DECODES)
def test_hif8_worked_decode(code: int, value: float) -> None:
    assert _hif8().decode(np.array([code], np.uint8))[0] == value


def test_hif8_rne_option_ties() -> None:
    """RNE (ties to even code) differs from the default RNA exactly at ties with an odd upper code."""
    fmt = _hif8()
    x = np.array([1.0625, 1.1875, 1.9375, 15.5, 28672.0, 1.5 * 2.0**-22, 1.5 * 2.0**-21, 2.0**-23], np.float32)
    assert fmt.encode(x, "rna").tolist() == [0x09, 0x0A, 0x10, 0x40, 0x6E, 0x02, 0x03, 0x01]
    assert fmt.encode(x, "rne").tolist() == [0x08, 0x0A, 0x10, 0x40, 0x6E, 0x02, 0x02, 0x01]


def test_int8_asymmetric_worked_example() -> None:
    """formats.md: range [-1, 3] in INT8 -> scale = 4/255, zero_point = -64; 3 -> 127, -1 -> -128."""
    fmt = get_format("int8")
    assert isinstance(fmt, IntegerFormat)
    scale, zp = fmt.compute_qparams(np.float32(-1.0), np.float32(3.0), symmetric=False)
    assert scale == np.float32(4 / 255) and round(float(scale), 7) == 0.0156863
    assert zp == -64 and zp.dtype == np.int8
    assert fmt.quantize(np.array([3.0, -1.0], np.float32), scale, zp).tolist() == [127, -128]


def _mx(name: str) -> MXFormat:
    fmt = get_format(name)
    assert isinstance(fmt, MXFormat)
    return fmt


def _block(*head: float) -> np.ndarray:
    block = np.zeros(32, np.float32)
    block[: len(head)] = head
    return block


@pytest.mark.parametrize(
    ("name", "block", "scale_byte", "expected"),
    [
        # MXFP4 block amax 5.0 -> X = 0 (0x7F); 5.0 -> 4.0 (RNE), 0.3 -> 0.5, -2.6 -> -3.0
        ("mxfp4", _block(5.0, 0.3, -2.6), 0x7F, [4.0, 0.5, -3.0]),
        # block amax 7.5 -> mantissa 1.875 > 1.75 -> X = 1 (0x80), 7.5 -> 8.0
        ("mxfp4", _block(7.5), 0x80, [8.0]),
        # MXFP8 block amax 300 -> X = 0, 300 -> 288
        ("mxfp8", _block(300.0), 0x7F, [288.0]),
        # amax 480 -> X = 1, 480 -> 480, 3.3 -> 3.25
        ("mxfp8", _block(480.0, 3.3), 0x80, [480.0, 3.25]),
    ],
)
def test_mx_worked_examples(name: str, block: np.ndarray, scale_byte: int, expected: list[float]) -> None:
    fmt = _mx(name)
    codes, scales = fmt.quantize(block)
    assert scales.tolist() == [scale_byte]
    out = fmt.dequantize(codes, scales)
    assert out[: len(expected)].tolist() == expected
    assert fmt.quantize_dequantize(block)[: len(expected)].tolist() == expected
    assert fmt.scale_exponents(block).tolist() == [scale_byte - 127]


def test_mx_all_zero_block() -> None:
    for name in ("mxfp8", "mxfp4"):
        codes, scales = _mx(name).quantize(np.zeros((2, 32), np.float32))
        assert scales.tolist() == [[0x00], [0x00]] and not codes.any()
