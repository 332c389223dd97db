"""onnxcomp.formats: the numeric-format codecs (spec: docs/formats.md).

One registry, three codec families:

* :class:`IntegerFormat` - int8, uint8, int4, uint4, int16, uint16 (ONNX QuantizeLinear arithmetic);
* :class:`ElementFormat` - fp8_e4m3, fp8_e5m2, hif8, fp4_e2m1, fp4_e1m2 (one code per element);
* :class:`MXFormat` - mxfp8, mxfp4 (32-element blocks sharing an E8M0 scale).

>>> get_format("hif8").encode([1.0625])  # RNA tie -> 1.125
array([9], dtype=uint8)
"""

from __future__ import annotations

from typing import TypeAlias

from onnx import TensorProto

from onnxcomp.errors import FormatError
from onnxcomp.formats.base import ElementFormat
from onnxcomp.formats.hif8 import HiF8Format
from onnxcomp.formats.integer import IntegerFormat
from onnxcomp.formats.minifloat import MinifloatFormat
from onnxcomp.formats.mx import MXFormat

__all__ = [
    "ElementFormat",
    "Format",
    "HiF8Format",
    "IntegerFormat",
    "MXFormat",
    "MinifloatFormat",
    "available_formats",
    "get_format",
]

Format: TypeAlias = IntegerFormat | ElementFormat | MXFormat


def _build() -> dict[str, Format]:
    fp8_e4m3 = MinifloatFormat(
        name="fp8_e4m3", bits=8, onnx_dtype=TensorProto.FLOAT8E4M3FN, nonfinite="saturate",
        exp_bits=4, man_bits=3, bias=7, specials="fn",
    )  # fmt: skip
    fp4_e2m1 = MinifloatFormat(
        name="fp4_e2m1", bits=4, onnx_dtype=TensorProto.FLOAT4E2M1, nonfinite="error",
        exp_bits=2, man_bits=1, bias=1, specials="none",
    )  # fmt: skip
    formats: list[Format] = [
        IntegerFormat(name="int8", bits=8, signed=True, onnx_dtype=TensorProto.INT8),
        IntegerFormat(name="uint8", bits=8, signed=False, onnx_dtype=TensorProto.UINT8),
        IntegerFormat(name="int4", bits=4, signed=True, onnx_dtype=TensorProto.INT4),
        IntegerFormat(name="uint4", bits=4, signed=False, onnx_dtype=TensorProto.UINT4),
        # 16-bit Q/DQ is standard ONNX since opset 21; onnxruntime CPU runs it (no integer kernel)
        IntegerFormat(name="int16", bits=16, signed=True, onnx_dtype=TensorProto.INT16),
        IntegerFormat(name="uint16", bits=16, signed=False, onnx_dtype=TensorProto.UINT16),
        fp8_e4m3,
        MinifloatFormat(
            name="fp8_e5m2",
            bits=8,
            onnx_dtype=TensorProto.FLOAT8E5M2,
            nonfinite="keep",
            exp_bits=5,
            man_bits=2,
            bias=15,
            specials="ieee",
        ),  # fmt: skip
        HiF8Format(
            name="hif8",
            bits=8,
            onnx_dtype=None,
            default_rounding="rna",
            roundings=("rna", "rne"),
        ),  # fmt: skip
        fp4_e2m1,
        MinifloatFormat(
            name="fp4_e1m2",
            bits=4,
            onnx_dtype=None,
            nonfinite="error",
            exp_bits=1,
            man_bits=2,
            bias=1,
            specials="none",
        ),  # fmt: skip
        MXFormat(name="mxfp8", element=fp8_e4m3, emax_elem=8),
        MXFormat(name="mxfp4", element=fp4_e2m1, emax_elem=2),
    ]
    return {f.name: f for f in formats}


_FORMATS: dict[str, Format] = _build()


def available_formats() -> list[str]:
    """Names accepted by :func:`get_format`, in registry order."""
    return list(_FORMATS)


def get_format(name: str) -> Format:
    """The codec registered as ``name``; FormatError listing the known names otherwise."""
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown numeric format {name!r}; known formats: {', '.join(_FORMATS)}") from None
