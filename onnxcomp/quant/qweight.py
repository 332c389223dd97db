"""A quantized weight: stored codes, scales and zero points, and how the codes are grouped.

:class:`QuantizedWeight` is what weight quantization (:mod:`onnxcomp.quant.weights`,
:mod:`onnxcomp.quant.lowbit`) hands to the emitters (:mod:`onnxcomp.quant.emit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxcomp.errors import ConfigError
from onnxcomp.formats import ElementFormat, Format, IntegerFormat
from onnxcomp.ir import WeightLayout
from onnxcomp.quant.spec import TensorSpec


@dataclass
class QuantizedWeight:
    """A quantized weight: codes in ONNX storage dtype + DequantizeLinear parameters."""

    codes: np.ndarray  # storage dtype (np.int8/uint8/int16/uint16, ml_dtypes int4/uint4/float8)
    scale: np.ndarray  # float32, shape () | (C,) | blocked shape (same rank as the weight)
    zero_point: np.ndarray | None  # storage dtype, shape of scale; None for the HiF8 table (storage "lut")
    axis: int | None  # DQ axis (None for per-tensor)
    block_size: int  # 0 unless per-group
    dequantized: np.ndarray  # float32: exactly what DQ computes
    spec: TensorSpec
    storage: str = "dq"  # dq | lut (HiF8 table) | lut_dq (uint4 -> int8 table -> DQ) | dq2; see quant.lowbit
    group_scale_codes: np.ndarray | None = None  # storage "dq2" (two-level): FP8 E4M3 group-scale codes
    algorithm: dict[str, Any] | None = None  # how the codes were chosen when not round-to-nearest (GPTQ ...)


def unit_view(w: np.ndarray, spec: TensorSpec, layout: WeightLayout) -> tuple[np.ndarray, tuple[int, ...], int]:
    """``w`` arranged so that reducing over the returned axes gives one value per scaling unit.

    Returns (array, reduce_axes, padded length of the reduction axis or 0).
    Per-group pads the reduction axis with zeros to a multiple of the group size and splits it
    into (groups, size): the padding never changes amax and is dropped after quantization.
    """
    g = spec.granularity
    if g.kind == "tensor":
        return w, tuple(range(w.ndim)), 0
    if g.kind == "channel":
        return w, tuple(a for a in range(w.ndim) if a != layout.channel_axis), 0
    r, size = layout.reduction_axis, g.size
    length = w.shape[r]
    padded = -(-length // size) * size
    if padded != length:
        pad = [(0, 0)] * w.ndim
        pad[r] = (0, padded - length)
        w = np.pad(w, pad)
    shape = w.shape[:r] + (padded // size, size) + w.shape[r + 1 :]
    return w.reshape(shape), (r + 1,), padded


def storage_array(codes: np.ndarray, fmt: Format) -> np.ndarray:
    """Codes as the numpy/ml_dtypes array numpy_helper writes as ``fmt.onnx_dtype``."""
    import ml_dtypes

    if fmt.onnx_dtype is None:
        raise ConfigError(f"format {fmt.name!r} has no ONNX storage type; it is emitted by the low-bit emitters")
    name = fmt.name
    if isinstance(fmt, IntegerFormat) and fmt.bits in (8, 16):  # numpy holds these codes natively
        return codes.astype(fmt.storage_dtype)
    # ml_dtypes keeps a 4-bit code in the low nibble of a byte (two's complement for int4, high
    # nibble 0): set from the byte directly; its value cast runs element by element (3x slower)
    if name == "int4":
        return (codes.astype(np.int8, copy=False).view(np.uint8) & np.uint8(0x0F)).view(ml_dtypes.int4)
    if name == "uint4":
        return codes.astype(np.uint8).view(ml_dtypes.uint4)
    if name == "fp8_e4m3":
        return np.asarray(codes, dtype=np.uint8, order="C").view(ml_dtypes.float8_e4m3fn)
    if name == "fp8_e5m2":
        return np.asarray(codes, dtype=np.uint8, order="C").view(ml_dtypes.float8_e5m2)
    if isinstance(fmt, ElementFormat) and name == "fp4_e2m1":
        # every code's value is exactly representable: a value cast is exact
        return fmt.decode(codes).astype(ml_dtypes.float4_e2m1fn)
    raise ConfigError(f"no ONNX storage for format {name!r}")
