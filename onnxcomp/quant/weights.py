"""Offline weight quantization: layouts, per-tensor / per-channel / per-group scales, codes.

The output of :func:`quantize_weight` is everything an emitter needs to write
``codes -> DequantizeLinear(scale, zero_point, axis, block_size)`` and everything a simulation
needs (``dequantized``, bit-identical to what DequantizeLinear computes at run time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp.errors import ConfigError, FormatError
from onnxcomp.formats import ElementFormat, IntegerFormat, MXFormat, get_format
from onnxcomp.quant.qparams import dequantize, qparams_for_range, quantize
from onnxcomp.quant.spec import TensorSpec

#: Candidate clipping ratios of the weight "mse" observer (1.0 = plain amax).
MSE_RATIOS = np.linspace(0.2, 1.0, 41)


@dataclass(frozen=True)
class WeightLayout:
    """Where the output channels and the reduction (input) axis of a weight are."""

    channel_axis: int
    reduction_axis: int


def weight_layout(op: str, rank: int, trans_b: bool = False) -> WeightLayout:
    """Axes of a weight by op (``../shared/spec/formats.md``, 量化粒度: ONNX layouts)."""
    if op == "Conv":
        return WeightLayout(0, 1)  # (Cout, Cin/g, k...)
    if op == "ConvTranspose":
        return WeightLayout(1, 0)  # (Cin, Cout/g, k...)
    if op == "Gemm":
        return WeightLayout(0, 1) if trans_b else WeightLayout(1, 0)
    if op == "MatMul":
        return WeightLayout(rank - 1, rank - 2)  # (..., K, N)
    raise ConfigError(f"no weight layout for op {op!r}")


@dataclass
class QuantizedWeight:
    """A quantized weight: codes in ONNX storage dtype + DequantizeLinear parameters."""

    codes: np.ndarray  # storage dtype (np.int8/uint8, ml_dtypes int4/uint4/float8)
    scale: np.ndarray  # float32, shape () | (C,) | blocked shape (same rank as the weight)
    zero_point: np.ndarray  # storage dtype, shape of scale
    axis: int | None  # DQ axis (None for per-tensor)
    block_size: int  # 0 unless per-group
    dequantized: np.ndarray  # float32: exactly what DQ computes
    spec: TensorSpec
    storage: str = "dq"  # dq | lut (HiF8 table) | lut_dq (uint4 -> int8 table -> DQ); see quant.lowbit


def _unit_view(w: np.ndarray, spec: TensorSpec, layout: WeightLayout) -> tuple[np.ndarray, tuple[int, ...], int]:
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


def _unit_amax(view: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return view.min(axis=axes, keepdims=True), view.max(axis=axes, keepdims=True)


def _qdq_units(fmt: IntegerFormat | ElementFormat, view: np.ndarray, lo: np.ndarray, hi: np.ndarray, symmetric: bool):  # noqa: ANN202
    """(codes, scale, zero_point, dequantized) for ``view`` with per-unit ranges (keepdims)."""
    scale, zp = qparams_for_range(fmt, lo, hi, symmetric)
    codes = quantize(fmt, view, scale, zp)
    return codes, scale, zp, dequantize(fmt, codes, scale, zp)


def quantize_weight(
    w: np.ndarray,
    spec: TensorSpec,
    layout: WeightLayout,
    name: str = "",
    fp4_storage: str = "int8",
    input_energy: np.ndarray | None = None,
) -> QuantizedWeight:
    """Quantize a constant float weight per ``spec``.

    Scale choice by ``spec.observer``: ``minmax`` (the amax rule), ``mse`` (clipping search
    minimising the weight error per scaling unit) or ``output_mse`` (the same search weighted by
    ``input_energy``, the mean x^2 of each input channel on calibration data: the layer's output
    error under the diagonal approximation).
    """
    fmt = get_format(spec.dtype)
    w32 = np.asarray(w, dtype=np.float32)
    if isinstance(fmt, MXFormat):
        from onnxcomp.quant.lowbit import quantize_mx_weight

        if not np.isfinite(w32).all():
            bad = int(np.count_nonzero(~np.isfinite(w32)))
            raise FormatError(f"weight {name!r}: {bad} NaN/Inf values; fix the model before quantizing")
        return quantize_mx_weight(w32, fmt, layout, spec, fp4_storage, name)
    if not np.isfinite(w32).all():
        bad = int(np.count_nonzero(~np.isfinite(w32)))
        raise FormatError(f"weight {name!r}: {bad} NaN/Inf values; fix the model before quantizing")
    if spec.granularity.kind == "group" and w32.shape[layout.reduction_axis] < 2:
        raise ConfigError(f"weight {name!r}: reduction axis too short for per-group quantization")
    view, axes, padded = _unit_view(w32, spec, layout)
    if spec.scale_format is not None:
        from onnxcomp.quant.lowbit import quantize_two_level

        return quantize_two_level(w32, spec, layout, fp4_storage)
    lo, hi = _unit_amax(view, axes)
    codes, scale, zp, deq = _qdq_units(fmt, view, lo, hi, spec.symmetric)
    if spec.observer in ("mse", "output_mse"):
        weight = 1.0
        if spec.observer == "output_mse":
            if input_energy is None:
                raise ConfigError(f"weight {name!r}: observer output_mse needs calibration data (input energies)")
            weight = _energy_view(input_energy, view.shape, spec, layout, w32.shape[layout.reduction_axis])
        err = (weight * (deq - view) ** 2).sum(axis=axes, keepdims=True, dtype=np.float64)
        for ratio in MSE_RATIOS[:-1]:
            c2, s2, z2, d2 = _qdq_units(fmt, view, lo * ratio, hi * ratio, spec.symmetric)
            e2 = (weight * (d2 - view) ** 2).sum(axis=axes, keepdims=True, dtype=np.float64)
            better = e2 < err
            if better.any():
                err = np.where(better, e2, err)
                scale, zp = np.where(better, s2, scale), np.where(better, z2, zp)
                codes = np.where(better, c2, codes)
                deq = np.where(better, d2, deq)
    return _to_onnx_layout(codes, scale, zp, deq, w32.shape, spec, layout, padded, fmt, fp4_storage)


def _to_onnx_layout(codes, scale, zp, deq, shape, spec, layout, padded, fmt, fp4_storage) -> QuantizedWeight:  # noqa: ANN001
    g = spec.granularity.kind
    if g == "group":
        r = layout.reduction_axis
        merged = shape[:r] + (padded,) + shape[r + 1 :]
        take = [slice(None)] * len(shape)
        take[r] = slice(0, shape[r])
        codes = codes.reshape(merged)[tuple(take)]
        deq = deq.reshape(merged)[tuple(take)]
        scale = np.squeeze(scale, axis=r + 1)
        zp = np.squeeze(zp, axis=r + 1)
        axis: int | None = r
        block = spec.granularity.size
    elif g == "channel":
        scale, zp = scale.reshape(-1), zp.reshape(-1)
        axis, block = layout.channel_axis, 0
    else:
        scale, zp = scale.reshape(()), zp.reshape(())
        axis, block = None, 0
    scale = np.asarray(scale, dtype=np.float32, order="C")
    if isinstance(fmt, ElementFormat):
        from onnxcomp.quant.lowbit import lowbit_storage

        stored, scale, zero, kind = lowbit_storage(fmt, codes, scale, fp4_storage)
    else:
        stored, zero, kind = storage_array(codes, fmt), storage_array(np.asarray(zp, order="C"), fmt), "dq"
    return QuantizedWeight(stored, scale, zero, axis, block, np.ascontiguousarray(deq, dtype=np.float32), spec, kind)


def storage_array(codes: np.ndarray, fmt: IntegerFormat | ElementFormat) -> np.ndarray:
    """Codes as the numpy/ml_dtypes array numpy_helper writes as ``fmt.onnx_dtype``."""
    import ml_dtypes

    if fmt.onnx_dtype is None:
        raise ConfigError(f"format {fmt.name!r} has no ONNX storage type; it is emitted by the low-bit emitters")
    name = fmt.name
    if name in ("int8", "uint8"):
        return codes.astype(fmt.storage_dtype)
    if name == "int4":
        return codes.astype(np.int8).astype(ml_dtypes.int4)
    if name == "uint4":
        return codes.astype(np.uint8).astype(ml_dtypes.uint4)
    if name == "fp8_e4m3":
        return np.asarray(codes, dtype=np.uint8, order="C").view(ml_dtypes.float8_e4m3fn)
    if name == "fp8_e5m2":
        return np.asarray(codes, dtype=np.uint8, order="C").view(ml_dtypes.float8_e5m2)
    if name == "fp4_e2m1":  # every code's value is exactly representable: a value cast is exact
        return fmt.decode(codes).astype(ml_dtypes.float4_e2m1fn)
    raise ConfigError(f"no ONNX storage for format {name!r}")


def min_opset_for(spec: TensorSpec) -> int:
    """The opset DequantizeLinear needs for this weight spec (../shared/spec/ort.md)."""
    if spec.dtype in ("int4", "uint4", "fp4_e1m2", "mxfp8", "mxfp4") or spec.granularity.kind == "group":
        return 21
    if spec.dtype.startswith("fp8"):
        return 19
    return 13


class InputEnergyObserver:
    """Mean of x^2 per input channel of a layer (channel ``axis`` of its activation), mergeable.

    Weights the weight-error search by how strongly each input channel is driven, i.e. the
    layer's output error under the independent-inputs (diagonal) approximation:
    E||x (W - W')||^2 ~ sum_k E[x_k^2] * sum_n (W - W')_{k,n}^2.
    """

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        moved = np.moveaxis(np.asarray(x, np.float64), self.axis, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        part = np.einsum("ij,ij->j", flat, flat)
        self.sum = part if self.sum is None else self.sum + part
        self.count += flat.shape[0]

    def merge(self, other: InputEnergyObserver) -> None:
        if other.sum is not None:
            self.sum = other.sum.copy() if self.sum is None else self.sum + other.sum
            self.count += other.count

    def energy(self) -> np.ndarray:
        assert self.sum is not None and self.count
        return self.sum / self.count


def _energy_view(h: np.ndarray, view_shape: tuple[int, ...], spec: TensorSpec, layout: WeightLayout, length: int) -> np.ndarray:
    """Input-channel energies arranged to broadcast against the weight's unit view."""
    r = layout.reduction_axis
    rank = len(view_shape)
    if spec.granularity.kind == "group":
        size = spec.granularity.size
        padded = np.zeros(view_shape[r] * size)
        padded[:length] = h
        shape = [1] * rank
        shape[r], shape[r + 1] = view_shape[r], size
        return padded.reshape(shape)
    shape = [1] * rank
    shape[r] = length
    return h.reshape(shape)
