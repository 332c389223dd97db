"""Registry and interface contract of onnxcomp.formats (issue 3, item 1-2)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from onnxcomp.errors import FormatError
from onnxcomp.formats import (
    ElementFormat,
    IntegerFormat,
    MXFormat,
    available_formats,
    get_format,
)

EXPECTED = {
    # name: (kind, bits, onnx dtype)
    "int8": ("int", 8, TensorProto.INT8),
    "uint8": ("int", 8, TensorProto.UINT8),
    "int4": ("int", 4, TensorProto.INT4),
    "uint4": ("int", 4, TensorProto.UINT4),
    "int16": ("int", 16, TensorProto.INT16),
    "uint16": ("int", 16, TensorProto.UINT16),
    "fp8_e4m3": ("float", 8, TensorProto.FLOAT8E4M3FN),
    "fp8_e5m2": ("float", 8, TensorProto.FLOAT8E5M2),
    "hif8": ("float", 8, None),
    "fp4_e2m1": ("float", 4, TensorProto.FLOAT4E2M1),
    "fp4_e1m2": ("float", 4, None),
    "mxfp8": ("mx", 8, None),
    "mxfp4": ("mx", 4, None),
}


def test_available_formats_lists_every_name() -> None:
    assert available_formats() == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_attributes(name: str) -> None:
    fmt = get_format(name)
    kind, bits, onnx_dtype = EXPECTED[name]
    assert (fmt.name, fmt.kind, fmt.bits, fmt.onnx_dtype) == (name, kind, bits, onnx_dtype)
    cls = {"int": IntegerFormat, "float": ElementFormat, "mx": MXFormat}[kind]
    assert isinstance(fmt, cls)
    assert get_format(name) is fmt


@pytest.mark.parametrize("bad", ["fp8", "INT8", "", "float8_e4m3fn"])
def test_unknown_name_lists_known_names(bad: str) -> None:
    with pytest.raises(FormatError) as info:
        get_format(bad)
    message = str(info.value)
    assert "\n" not in message and repr(bad) in message
    assert all(name in message for name in EXPECTED)


@pytest.mark.parametrize("name", ["int8", "uint8", "int4", "uint4"])
def test_integer_ranges(name: str) -> None:
    fmt = get_format(name)
    assert isinstance(fmt, IntegerFormat)
    expected = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}[name]
    assert (fmt.qmin, fmt.qmax) == expected
    assert fmt.signed == name.startswith("int")
    assert fmt.storage_dtype == (np.int8 if fmt.signed else np.uint8)


def test_mx_attributes() -> None:
    mxfp8, mxfp4 = get_format("mxfp8"), get_format("mxfp4")
    assert isinstance(mxfp8, MXFormat) and isinstance(mxfp4, MXFormat)
    assert mxfp8.block_size == mxfp4.block_size == 32
    assert mxfp8.element is get_format("fp8_e4m3")
    assert mxfp4.element is get_format("fp4_e2m1")


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "hif8", "fp4_e2m1", "fp4_e1m2"])
def test_element_defaults_and_bad_rounding(name: str) -> None:
    fmt = get_format(name)
    assert isinstance(fmt, ElementFormat)
    assert fmt.default_rounding == ("rna" if name == "hif8" else "rne")
    with pytest.raises(FormatError, match="rounding"):
        fmt.encode([1.0], rounding="floor")
    if name != "hif8":
        with pytest.raises(FormatError):
            fmt.encode([1.0], rounding="rna")
    x = np.linspace(-3, 3, 7, dtype=np.float32).reshape(7, 1)
    assert fmt.encode(x).shape == (7, 1) and fmt.encode(x).dtype == np.uint8
    assert fmt.decode(fmt.encode(x)).dtype == np.float32
    assert fmt.quantize_dequantize(x).shape == (7, 1)
    assert fmt.encode(np.float32(1.0)).shape == ()
    assert fmt.encode(np.zeros((0, 3))).shape == (0, 3)
