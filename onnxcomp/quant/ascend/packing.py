"""Bit packing of the Ascend deploy format: UINT64 dequantization factors and INT4 weights.

Both layouts are those of ``docs/ascend.md`` ("deq_scale packing", "INT4 weights").
"""

from __future__ import annotations

import numpy as np

from onnxcomp.errors import FormatError

#: AMCT's FORCE_FP16_QUANT ("S19") mode keeps 19 significant bits: the low 13 mantissa bits cleared.
S19_MASK = np.uint32(0xFFFFE000)


def deq_scale(scale_d: np.float32, scale_w: np.ndarray, s19: bool = False) -> np.ndarray:
    """deq[c] = scale_d * scale_w[c] in float32 (the product ATC multiplies the int32 accumulator by)."""
    deq = (np.float32(scale_d) * np.asarray(scale_w, dtype=np.float32).reshape(-1)).astype(np.float32)
    if s19:
        deq = (deq.view(np.uint32) & S19_MASK).view(np.float32)
    return deq


def pack_deq_scale(deq: np.ndarray) -> np.ndarray:
    """UINT64 per channel: bits 0-31 the float32 bit pattern, upper word 0 (offset_w is always 0)."""
    bits = np.ascontiguousarray(np.asarray(deq, dtype=np.float32).reshape(-1)).view(np.uint32)
    return bits.astype(np.uint64)


def unpack_deq_scale(packed: np.ndarray) -> np.ndarray:
    """The float32 factors of a UINT64 parameter (the upper word must be 0: offset_w 0)."""
    packed = np.asarray(packed, dtype=np.uint64).reshape(-1)
    if np.any(packed >> np.uint64(32)):
        raise FormatError("AscendDequant parameter has a non-zero upper word (offset_w != 0 is not supported)")
    return (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)


def pack_int4(codes: np.ndarray, axis: int) -> np.ndarray:
    """INT4 codes in [-8, 7] packed two per byte along ``axis`` (2k low nibble, 2k+1 high nibble), as int8."""
    codes = np.asarray(codes)
    if codes.shape[axis] % 2:
        raise FormatError(f"INT4 packing needs an even input-channel axis, got {codes.shape[axis]}")
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise FormatError("INT4 codes must lie in [-8, 7]")
    moved = np.moveaxis(codes.astype(np.int16), axis, -1)
    low = moved[..., 0::2] & 0xF
    high = moved[..., 1::2] & 0xF
    packed = (low | (high << 4)).astype(np.uint8).view(np.int8)
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def unpack_int4(packed: np.ndarray, axis: int) -> np.ndarray:
    """The int8 codes of :func:`pack_int4` (sign-extended nibbles), the axis doubled."""
    moved = np.moveaxis(np.asarray(packed, dtype=np.int8).view(np.uint8), axis, -1).astype(np.int16)
    low = ((moved & 0xF) ^ 0x8) - 0x8
    high = (((moved >> 4) & 0xF) ^ 0x8) - 0x8
    out = np.empty(moved.shape[:-1] + (moved.shape[-1] * 2,), np.int8)
    out[..., 0::2] = low
    out[..., 1::2] = high
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def int4_axis(op: str, trans_b: bool = False) -> int:
    """The input-channel axis INT4 weights are packed along (docs/ascend.md)."""
    if op == "Conv":
        return 1
    if op in ("ConvTranspose", "MatMul"):
        return 0
    if op == "Gemm":
        return 1 if trans_b else 0
    raise FormatError(f"no INT4 packing axis for op {op!r}")
