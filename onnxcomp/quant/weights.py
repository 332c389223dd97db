"""Offline weight quantization: layouts, per-tensor / per-channel / per-group scales, codes.

The output of :func:`quantize_weight` is everything an emitter needs to write
``codes -> DequantizeLinear(scale, zero_point, axis, block_size)`` and everything a simulation
needs (``dequantized``, bit-identical to what DequantizeLinear computes at run time).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from onnxcomp.errors import ConfigError, FormatError
from onnxcomp.formats import ElementFormat, IntegerFormat, MXFormat, get_format
from onnxcomp.ir import WeightLayout
from onnxcomp.quant.lowbit import lowbit_storage, quantize_mx_weight, quantize_two_level
from onnxcomp.quant.qparams import dequantize, qparams_for_range, quantize
from onnxcomp.quant.qweight import QuantizedWeight, storage_array, unit_view
from onnxcomp.quant.spec import TensorSpec

#: Candidate clipping ratios of the weight "mse" observer (1.0 = plain amax).
MSE_RATIOS = np.linspace(0.2, 1.0, 41)


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
        if not np.isfinite(w32).all():
            bad = int(np.count_nonzero(~np.isfinite(w32)))
            raise FormatError(f"weight {name!r}: {bad} NaN/Inf values; fix the model before quantizing")
        return quantize_mx_weight(w32, fmt, layout, spec, fp4_storage, name)
    if not np.isfinite(w32).all():
        bad = int(np.count_nonzero(~np.isfinite(w32)))
        raise FormatError(f"weight {name!r}: {bad} NaN/Inf values; fix the model before quantizing")
    if spec.granularity.kind == "group" and w32.shape[layout.reduction_axis] < 2:
        raise ConfigError(f"weight {name!r}: reduction axis too short for per-group quantization")
    view, axes, padded = unit_view(w32, spec, layout)
    if spec.scale_format is not None:
        return quantize_two_level(w32, spec, layout, fp4_storage)
    lo, hi = _unit_amax(view, axes)
    if spec.observer in ("mse", "output_mse"):
        weight: float | np.ndarray = 1.0
        if spec.observer == "output_mse":
            if input_energy is None:
                raise ConfigError(f"weight {name!r}: observer output_mse needs calibration data (input energies)")
            weight = _energy_view(input_energy, view.shape, spec, layout, w32.shape[layout.reduction_axis])
        if isinstance(fmt, IntegerFormat):
            lo, hi = _searched_range(fmt, view, axes, lo, hi, spec.symmetric, weight)
            codes, scale, zp, deq = _qdq_units(fmt, view, lo, hi, spec.symmetric)
            return _to_onnx_layout(codes, scale, zp, deq, w32.shape, spec, layout, padded, fmt, fp4_storage)
    codes, scale, zp, deq = _qdq_units(fmt, view, lo, hi, spec.symmetric)
    if spec.observer in ("mse", "output_mse"):
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


#: Elements per block of the integer search: the candidates are scored block by block so that the
#: block's scratch buffer stays in the CPU cache across all of them (one pass over memory per block).
SEARCH_BLOCK = 1 << 15
#: Threads of the search over a weight of ``SEARCH_THREADED_FROM`` elements or more: numpy lets go
#: of the GIL in every pass over a block (one scratch buffer per thread); the CPUs this process may run on.
SEARCH_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
SEARCH_THREADED_FROM = 1 << 20
#: Narrowest block along a later axis (per-channel MatMul weights [K, N] reduce over axis 0).
SEARCH_MIN_WIDTH = 128


def _searched_range(
    fmt: IntegerFormat,
    view: np.ndarray,
    axes: tuple[int, ...],
    lo: np.ndarray,
    hi: np.ndarray,
    symmetric: bool,
    weight: float | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The per-unit range of the clipping search: amax, else the first ratio of ``MSE_RATIOS`` with
    a strictly smaller error, exactly as trying amax then each ratio in turn would choose.

    Each candidate's error is computed with the arithmetic of QuantizeLinear + DequantizeLinear
    in float32 (the same values as ``_qdq_units``) in a cache-sized scratch buffer, block by
    block along the first axis the units do not reduce over, the blocks shared out between
    ``SEARCH_THREADS`` threads for big weights; each block keeps its best candidate as it goes,
    so only the chosen index per unit outlives it; the codes are computed once, afterwards.
    """
    # Candidate k scales the range by factors[k]: 1 (amax), then each ratio but the last (1.0);
    # a float32 bound times 1.0 in float64 is the bound itself, as the parameters see it.
    factors = np.concatenate([[1.0], MSE_RATIOS[:-1]]).reshape(-1, *([1] * view.ndim))
    # The chosen candidate per unit, kept as the search goes: no candidate's parameters or
    # errors are held for the whole weight.
    best = np.zeros(np.broadcast_shapes(lo.shape, hi.shape), np.int8)
    # Blocks along an axis no unit reduces over (the first): a unit's error is then summed over
    # the same elements in the same order, whatever the block and the thread.
    split = next((d for d in range(view.ndim) if d not in axes), -1)
    length = view.shape[split] if split >= 0 else 1
    step = max(1, SEARCH_BLOCK // max(1, view.size // length)) if length > 1 else 1
    if split > 0:  # blocks across rows: wide enough that each row's piece is one contiguous run
        step = min(length, max(step, SEARCH_MIN_WIDTH))

    def take(a: np.ndarray, start: int, stop: int) -> np.ndarray:
        index: list[slice] = [slice(None)] * a.ndim
        index[split] = slice(start, stop)
        return a[tuple(index)]

    def part(a: np.ndarray | float, start: int, stop: int) -> np.ndarray | float:
        """``a``'s block along ``split`` when ``a`` spans that axis per unit (else ``a``)."""
        if length == 1 or not isinstance(a, np.ndarray) or a.ndim != view.ndim or a.shape[split] != length:
            return a
        return take(a, start, stop)

    def search(starts: list[int]) -> None:
        shape = list(view.shape)
        if split >= 0:
            shape[split] = min(step, length)
        scratch = np.empty(shape, np.float32)
        for start in starts:
            stop = min(length, start + step)
            block = take(view, start, stop) if split >= 0 else view
            buf = take(scratch, 0, stop - start) if split >= 0 else scratch
            w_block = part(weight, start, stop)
            b_lo, b_hi, chosen = part(lo, start, stop), part(hi, start, stop), part(best, start, stop)
            assert isinstance(b_lo, np.ndarray) and isinstance(b_hi, np.ndarray) and isinstance(chosen, np.ndarray)
            least: np.ndarray | None = None
            scales, zps = qparams_for_range(fmt, b_lo * factors, b_hi * factors, symmetric)  # every candidate's
            shifts = zps.astype(np.float32)
            for k in range(factors.shape[0]):
                scale, z = scales[k], shifts[k]
                with np.errstate(over="ignore"):  # |x / scale| beyond float32 -> +-inf, clipped below
                    np.divide(block, scale, out=buf)
                np.rint(buf, out=buf)
                if z.any():  # signed symmetric grids have zp 0: nothing to add
                    np.add(buf, z, out=buf)
                    np.clip(buf, fmt.qmin, fmt.qmax, out=buf)
                    np.subtract(buf, z, out=buf)  # exact: integers below 2^24
                else:
                    np.clip(buf, fmt.qmin, fmt.qmax, out=buf)
                np.multiply(buf, scale, out=buf)
                np.subtract(buf, block, out=buf)
                np.square(buf, out=buf)
                err = buf if isinstance(w_block, float) else w_block * buf
                total = err.sum(axis=axes, keepdims=True, dtype=np.float64)
                if least is None:
                    least = total
                else:  # only a strictly smaller error replaces: the first of equals wins
                    better = total < least
                    np.copyto(least, total, where=better)
                    np.copyto(chosen, np.int8(k), where=better)

    starts = list(range(0, length, step))
    threads = min(SEARCH_THREADS, len(starts)) if view.size >= SEARCH_THREADED_FROM else 1
    if threads > 1:  # the blocks are independent: numpy lets go of the GIL in each pass over one
        with ThreadPoolExecutor(threads, thread_name_prefix="onnxcomp-search") as pool:
            list(pool.map(search, [starts[i::threads] for i in range(threads)]))
    else:
        search(starts)
    ratio = np.where(best == 0, 1.0, MSE_RATIOS[np.maximum(best - 1, 0)])
    # Units keeping amax keep their float32 range (its parameters are computed from it, not from x1.0).
    return np.where(best == 0, lo, lo * ratio), np.where(best == 0, hi, hi * ratio)


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
        stored, scale, zero, kind = lowbit_storage(fmt, codes, scale, fp4_storage)
    else:
        stored, zero, kind = storage_array(codes, fmt), storage_array(np.asarray(zp, order="C"), fmt), "dq"
    return QuantizedWeight(stored, scale, zero, axis, block, np.ascontiguousarray(deq, dtype=np.float32), spec, kind)


def min_opset_for(spec: TensorSpec) -> int:
    """The opset QuantizeLinear/DequantizeLinear need for this spec, weights or activations
    (``docs/onnxruntime.md#opset-limits``; INT16/UINT16 Q/DQ entered the standard at opset 21)."""
    wide = ("int4", "uint4", "int16", "uint16", "fp4_e1m2", "mxfp8", "mxfp4")
    if spec.dtype in wide or spec.granularity.kind == "group":
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


def _energy_view(
    h: np.ndarray, view_shape: tuple[int, ...], spec: TensorSpec, layout: WeightLayout, length: int
) -> np.ndarray:
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


def raise_scales(w: np.ndarray, qw: QuantizedWeight, floor: np.ndarray) -> tuple[QuantizedWeight, list[int]]:
    """``qw`` with its per-channel (or per-tensor) integer scales raised to at least ``floor``.

    ``floor`` has one value per output channel. Used when ``round(b / (s_x s_w))`` would not fit
    an int32 bias: only the channels below their floor change (codes recomputed on the wider
    grid); returns the new weight and the indices of the raised channels.
    """
    fmt = get_format(qw.spec.dtype)
    assert isinstance(fmt, IntegerFormat) and qw.spec.granularity.kind in ("tensor", "channel")
    scale = np.asarray(qw.scale, np.float32)
    need = np.asarray(floor, np.float32) if scale.ndim else np.asarray(floor, np.float32).max(keepdims=True)
    raised = np.flatnonzero(np.asarray(scale).reshape(-1) < need)
    if raised.size == 0:
        return qw, []
    new_scale = np.maximum(scale, need.reshape(scale.shape) if scale.ndim else need.reshape(()))
    shape = [1] * w.ndim
    if scale.ndim:
        assert qw.axis is not None
        shape[qw.axis] = -1
    zp = np.asarray(qw.zero_point)
    s_b, z_b = new_scale.reshape(shape), zp.astype(np.int32).reshape(shape)
    codes = quantize(fmt, np.asarray(w, np.float32), s_b, z_b)
    deq = dequantize(fmt, codes, s_b, z_b)
    stored = storage_array(codes, fmt)
    out = QuantizedWeight(stored, new_scale.astype(np.float32), qw.zero_point, qw.axis, 0, deq, qw.spec, qw.storage)
    return out, [int(i) for i in raised]
