"""Sub-byte storage: two 4-bit codes per byte, low nibble first (ONNX INT4/UINT4/FLOAT4E2M1).

The spec ("INT4 storage") asks for onnx's own packing; :func:`to_onnx_tensor` therefore builds the
TensorProto with ``onnx.numpy_helper.from_array`` on ml_dtypes arrays, and :func:`pack_nibbles`
produces the same bytes for callers that need them without a TensorProto (tested equal).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, numpy_helper

from onnxcomp.errors import FormatError

__all__ = ["pack_nibbles", "to_onnx_tensor", "unpack_nibbles"]

# ONNX element type -> (numpy dtype the array is built in, inclusive code range, ml_dtypes view)
_STORAGE: dict[int, tuple[type, int, int, type | None]] = {
    TensorProto.INT8: (np.int8, -128, 127, None),
    TensorProto.UINT8: (np.uint8, 0, 255, None),
    TensorProto.INT4: (np.int8, -8, 7, ml_dtypes.int4),
    TensorProto.UINT4: (np.uint8, 0, 15, ml_dtypes.uint4),
    TensorProto.FLOAT8E4M3FN: (np.uint8, 0, 255, ml_dtypes.float8_e4m3fn),
    TensorProto.FLOAT8E5M2: (np.uint8, 0, 255, ml_dtypes.float8_e5m2),
    TensorProto.FLOAT4E2M1: (np.uint8, 0, 15, ml_dtypes.float4_e2m1fn),
}


def _int_codes(codes: npt.ArrayLike, lo: int, hi: int, what: str) -> np.ndarray:
    c = np.asarray(codes)
    if c.dtype.kind not in "iu":
        raise FormatError(f"{what}: codes must be integers, got dtype {c.dtype}")
    if c.size and (int(c.min()) < lo or int(c.max()) > hi):
        raise FormatError(f"{what}: codes must lie in [{lo}, {hi}], got [{c.min()}, {c.max()}]")
    return c


def pack_nibbles(codes: npt.ArrayLike) -> np.ndarray:
    """Pack 4-bit codes (flattened in C order) two per byte, element 2i in the low nibble.

    Accepts signed INT4 codes (-8..7, stored as their two's-complement nibble) or unsigned
    nibbles (0..15). An odd count leaves the last high nibble zero. Returns a uint8 array of
    ``ceil(n / 2)`` bytes (``.tobytes()`` is ONNX ``raw_data``).
    """
    c = _int_codes(codes, -8, 15, "pack_nibbles").reshape(-1)
    nib = c.astype(np.int16).astype(np.uint8) & np.uint8(0x0F)  # -1 -> 0xFF -> 0x0F
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return nib[0::2] | (nib[1::2] << np.uint8(4))


def unpack_nibbles(packed: npt.ArrayLike | bytes, count: int, *, signed: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: the first ``count`` nibbles, low nibble first.

    Returns uint8 nibbles 0..15, or sign-extended int8 codes -8..7 with ``signed=True``.
    """
    if isinstance(packed, bytes | bytearray | memoryview):
        p = np.frombuffer(packed, dtype=np.uint8)
    else:
        p = np.asarray(packed).reshape(-1)
        if p.dtype != np.uint8:
            p = _int_codes(p, 0, 255, "unpack_nibbles").astype(np.uint8)
    if not 0 <= count <= 2 * p.size:
        raise FormatError(f"unpack_nibbles: {p.size} bytes hold at most {2 * p.size} nibbles, asked {count}")
    out = np.empty(2 * p.size, np.uint8)
    out[0::2] = p & np.uint8(0x0F)
    out[1::2] = p >> np.uint8(4)
    out = out[:count]
    if signed:
        return (out.astype(np.int8) ^ np.int8(8)) - np.int8(8)
    return out


def _resolve_dtype(fmt: str | int) -> int:
    if isinstance(fmt, str):
        from onnxcomp.formats import (
            get_format,  # late import: the registry imports this module
        )

        dtype = get_format(fmt).onnx_dtype
        if dtype is None:
            raise FormatError(f"format {fmt!r} has no ONNX storage type")
        return dtype
    return int(fmt)


def to_onnx_tensor(
    codes: npt.ArrayLike,
    fmt: str | int,
    name: str,
    dims: Sequence[int] | None = None,
) -> onnx.TensorProto:
    """TensorProto of element type ``fmt`` (format name or ``onnx.TensorProto`` enum) holding
    ``codes`` with shape ``dims`` (default: the codes' shape).

    Codes are what the codecs produce: IntegerFormat storage values for INT8/UINT8/INT4/UINT4,
    uint8 bit patterns for FLOAT8E4M3FN/FLOAT8E5M2/FLOAT4E2M1. The array is viewed as the
    matching ml_dtypes type and handed to ``onnx.numpy_helper.from_array``, so sub-byte types
    are packed by onnx itself (low nibble first).
    """
    dtype = _resolve_dtype(fmt)
    if dtype not in _STORAGE:
        raise FormatError(f"to_onnx_tensor: unsupported ONNX element type {onnx.helper.tensor_dtype_to_string(dtype)}")
    np_type, lo, hi, view = _STORAGE[dtype]
    c = _int_codes(codes, lo, hi, f"to_onnx_tensor({name!r})").astype(np_type)
    if dims is not None:
        if int(np.prod(dims, dtype=np.int64)) != c.size:
            raise FormatError(f"to_onnx_tensor({name!r}): {c.size} codes do not fill dims {list(dims)}")
        c = c.reshape(tuple(dims))
    if view is not None:
        c = c.astype(view) if view in (ml_dtypes.int4, ml_dtypes.uint4) else c.view(view)
    return numpy_helper.from_array(c, name)
