"""Packed unsigned low-bit codes in rows, as ``com.microsoft.MatMulNBits`` stores them.

Codes of ``bits`` bits (4 or 8) are packed along the last axis: 8-bit codes one a byte, 4-bit
codes two a byte with the lower-index code in the low nibble (an odd row gets a zero nibble).
"""

from __future__ import annotations

import numpy as np

#: Rows of the source copied per strip by :func:`transposed`: wide enough that every output row
#: gets whole cache lines, narrow enough that the strip's columns stay cached.
_TRANSPOSE_STRIP = 256


def transposed(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of the 2-D ``a.T``, copied in strips of rows.

    numpy's own copy of a transposed byte array walks the source one byte per cache line (about
    7x slower on a 5632 x 2048 code matrix); a strip of rows transposed at a time is the same
    bytes, in cache.
    """
    rows, cols = a.shape
    out = np.empty((cols, rows), a.dtype)
    for start in range(0, rows, _TRANSPOSE_STRIP):
        out[:, start : start + _TRANSPOSE_STRIP] = a[start : start + _TRANSPOSE_STRIP].T
    return out


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (< 2**bits) packed along the last axis into uint8."""
    if bits == 8:
        return np.ascontiguousarray(values, np.uint8)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    values = np.asarray(values, np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    if values.size == 0:
        return np.zeros((*values.shape[:-1], values.shape[-1] // 2), np.uint8)
    # Each pair of the (nibble-masked) codes read as one little-endian uint16 p = even + 256 * odd:
    # p >> 4 = odd << 4, so the low byte of p | (p >> 4) is even | odd << 4. Three passes.
    pairs = np.bitwise_and(values, np.uint8(0x0F), order="C").view("<u2")
    packed = pairs >> 4
    np.bitwise_or(packed, pairs, out=packed)
    return packed.astype(np.uint8)


def unpack_rows(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """The first ``length`` codes of every row of :func:`pack_rows`' output."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :length]
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :length]
