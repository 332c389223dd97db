"""Sub-byte packing against onnx's own packing (numpy_helper.from_array / to_array)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, numpy_helper
from packing import pack_nibbles, to_onnx_tensor, unpack_nibbles

from onnxcomp.errors import FormatError
from onnxcomp.formats import ElementFormat, IntegerFormat, get_format


def test_pack_layout_low_nibble_first() -> None:
    assert pack_nibbles(np.array([1, 2, 3], np.uint8)).tolist() == [0x21, 0x03]
    assert pack_nibbles(np.array([-1, 7, -8], np.int8)).tolist() == [0x7F, 0x08]
    assert unpack_nibbles(bytes([0x21, 0x03]), 3).tolist() == [1, 2, 3]
    assert unpack_nibbles(np.array([0x7F, 0x08], np.uint8), 3, signed=True).tolist() == [-1, 7, -8]
    assert pack_nibbles(np.zeros(0, np.uint8)).size == 0


@pytest.mark.parametrize("shape", [(1,), (7,), (4, 5), (3, 3, 3), (2, 0)])
@pytest.mark.parametrize("fmt_name", ["int4", "uint4", "fp4_e2m1"])
def test_round_trip_against_onnx(fmt_name: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    fmt = get_format(fmt_name)
    if isinstance(fmt, IntegerFormat):
        codes = rng.integers(fmt.qmin, fmt.qmax + 1, size=shape).astype(fmt.storage_dtype)
    else:
        assert isinstance(fmt, ElementFormat)
        codes = fmt.encode(rng.standard_normal(shape) * 3)
    tensor = to_onnx_tensor(codes, fmt_name, "w")
    assert tensor.data_type == fmt.onnx_dtype and list(tensor.dims) == list(shape) and tensor.name == "w"
    assert tensor.raw_data == pack_nibbles(codes).tobytes()
    back = numpy_helper.to_array(tensor)
    if fmt_name == "fp4_e2m1":
        assert back.dtype == ml_dtypes.float4_e2m1fn
        assert np.array_equal(back.view(np.uint8), codes)
        assert np.array_equal(back.astype(np.float32), fmt.decode(codes))
    else:
        assert np.array_equal(back.astype(np.int16), codes.astype(np.int16))
    signed = fmt_name == "int4"
    unpacked = unpack_nibbles(tensor.raw_data, codes.size, signed=signed)
    assert np.array_equal(unpacked.astype(np.int16), codes.reshape(-1).astype(np.int16))


def test_onnx_dtype_argument_and_dims() -> None:
    codes = np.arange(-8, 8, dtype=np.int8)
    tensor = to_onnx_tensor(codes, TensorProto.INT4, "w", dims=(4, 4))
    assert list(tensor.dims) == [4, 4]
    assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int8), codes.reshape(4, 4))
    fp8 = get_format("fp8_e4m3")
    assert isinstance(fp8, ElementFormat)
    c8 = fp8.encode(np.array([1.0, -448.0, 0.1], np.float32))
    t8 = to_onnx_tensor(c8, "fp8_e4m3", "a")
    assert t8.data_type == TensorProto.FLOAT8E4M3FN
    assert np.array_equal(numpy_helper.to_array(t8).astype(np.float32), fp8.decode(c8))


def test_errors() -> None:
    with pytest.raises(FormatError, match=r"\[-8, 7\]"):
        to_onnx_tensor(np.array([9], np.int8), "int4", "w")
    with pytest.raises(FormatError, match="no ONNX storage type"):
        to_onnx_tensor(np.array([1], np.uint8), "hif8", "w")
    with pytest.raises(FormatError, match="dims"):
        to_onnx_tensor(np.array([1, 2, 3], np.uint8), "uint4", "w", dims=(2, 2))
    with pytest.raises(FormatError, match="unsupported"):
        to_onnx_tensor(np.array([1], np.uint8), TensorProto.FLOAT, "w")
    with pytest.raises(FormatError):
        pack_nibbles(np.array([16], np.uint8))
    with pytest.raises(FormatError):
        pack_nibbles(np.array([0.5]))
    with pytest.raises(FormatError, match="at most 2 nibbles"):
        unpack_nibbles(b"\x00", 3)
