"""Packed unsigned low-bit codes in rows, as ``com.microsoft.MatMulNBits`` stores them.

Codes of ``bits`` bits (4 or 8) are packed along the last axis: 8-bit codes one a byte, 4-bit
codes two a byte with the lower-index code in the low nibble (an odd row gets a zero nibble).
"""

from __future__ import annotations

import numpy as np


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
    # Each pair of codes read as one little-endian uint16 (low byte = the even code): one pass
    pairs = np.ascontiguousarray(values).view("<u2")
    return ((pairs & 0x0F) | ((pairs >> 4) & 0xF0)).astype(np.uint8)


def unpack_rows(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """The first ``length`` codes of every row of :func:`pack_rows`' output."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :length]
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :length]
