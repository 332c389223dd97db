"""The weight clipping search (observers mse / output_mse) against the brute-force sequential search.

The search scores every candidate range in a scratch buffer, block by block (on several threads for
big weights); these tests pin that it picks exactly what trying amax, then each ratio of
``MSE_RATIOS`` in turn, keeping a candidate only when its error is strictly smaller, picks: same
codes, scales, zero points and dequantized values, bit for bit, for every integer format,
granularity and weighting, on one thread and on three.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.formats import get_format
from onnxcomp.ir import WeightLayout
from onnxcomp.quant import weights as weights_module
from onnxcomp.quant.qparams import dequantize, qparams_for_range, quantize
from onnxcomp.quant.qweight import unit_view
from onnxcomp.quant.spec import TensorSpec, parse_granularity
from onnxcomp.quant.weights import MSE_RATIOS, quantize_weight


def _sequential_search(
    w: np.ndarray, spec: TensorSpec, layout: WeightLayout, energy: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scale, dequantized) on the unit view: amax, then every ratio, strict improvements only."""
    fmt = get_format(spec.dtype)
    view, axes, _ = unit_view(w, spec, layout)
    weight: float | np.ndarray = 1.0
    if energy is not None:
        weight = weights_module._energy_view(energy, view.shape, spec, layout, w.shape[layout.reduction_axis])
    lo, hi = view.min(axis=axes, keepdims=True), view.max(axis=axes, keepdims=True)

    def qdq(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale, zp = qparams_for_range(fmt, a, b, spec.symmetric)
        codes = quantize(fmt, view, scale, zp)
        return codes, scale, dequantize(fmt, codes, scale, zp)

    codes, scale, deq = qdq(lo, hi)
    best = (weight * (deq - view) ** 2).sum(axis=axes, keepdims=True, dtype=np.float64)
    for ratio in MSE_RATIOS[:-1]:
        c2, s2, d2 = qdq(lo * ratio, hi * ratio)
        err = (weight * (d2 - view) ** 2).sum(axis=axes, keepdims=True, dtype=np.float64)
        better = err < best
        best = np.where(better, err, best)
        codes, scale, deq = np.where(better, c2, codes), np.where(better, s2, scale), np.where(better, d2, deq)
    return codes, scale, deq


def _weight(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w.reshape(-1)[:: max(1, w.size // 7)] *= 12.0  # outliers: the search clips them
    w.reshape(shape[0], -1)[0] = 0.0  # an all-zero unit (scale 1, every candidate ties)
    w.reshape(shape[0], -1)[1] = 0.25  # a constant unit: ties between candidates
    return w


CASES = [
    # (dtype, granularity, symmetric, layout, shape)
    ("int4", "group:32", True, WeightLayout(1, 0), (96, 80)),  # MatMul [K, N], K padded to 96
    ("int4", "group:32", True, WeightLayout(0, 1), (40, 70)),  # Gemm transB [N, K], K padded
    ("int4", "channel", True, WeightLayout(1, 0), (64, 48)),  # reduction over axis 0: column blocks
    ("uint4", "channel", True, WeightLayout(1, 0), (40, 50)),  # column blocks, the last one narrower
    ("uint4", "group:32", True, WeightLayout(1, 0), (64, 24)),  # symmetric unsigned: zero point 8
    ("int4", "group:32", False, WeightLayout(1, 0), (64, 24)),  # affine: per-unit zero points
    ("int8", "channel", True, WeightLayout(0, 1), (16, 8, 3, 3)),  # Conv [Cout, Cin, kh, kw]
    ("int8", "tensor", True, WeightLayout(1, 0), (32, 16)),
    ("uint8", "channel", False, WeightLayout(0, 1), (24, 40)),
    ("int4", "group:32", True, WeightLayout(1, 0), (4096, 40)),  # several blocks along axis 0
]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("observer", ["mse", "output_mse"])
@pytest.mark.parametrize(("dtype", "granularity", "symmetric", "layout", "shape"), CASES)
def test_search_matches_sequential_reference_bit_for_bit(
    dtype: str,
    granularity: str,
    symmetric: bool,
    layout: WeightLayout,
    shape: tuple[int, ...],
    observer: str,
    threads: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(weights_module, "SEARCH_BLOCK", 512)  # many blocks even on small weights
    monkeypatch.setattr(weights_module, "SEARCH_MIN_WIDTH", 8)  # column blocks of 8 on (K, N) per channel
    monkeypatch.setattr(weights_module, "SEARCH_THREADS", threads)  # blocks shared out between threads
    monkeypatch.setattr(weights_module, "SEARCH_THREADED_FROM", 0)
    spec = TensorSpec(dtype, parse_granularity(granularity), symmetric=symmetric, observer=observer)
    w = _weight(shape, seed=len(shape) * 7 + shape[0])
    energy = None
    if observer == "output_mse":
        energy = np.random.default_rng(1).uniform(0.01, 4.0, w.shape[layout.reduction_axis])
    got = quantize_weight(w, spec, layout, "w", input_energy=energy)
    codes, scale, deq = _sequential_search(w, spec, layout, energy)
    r = layout.reduction_axis
    merged = deq.reshape(w.shape[:r] + (-1,) + w.shape[r + 1 :])  # group: (groups, size) -> padded axis
    np.testing.assert_array_equal(np.asarray(got.dequantized), np.take(merged, np.arange(w.shape[r]), axis=r))
    assert np.asarray(got.scale).tobytes() == np.asarray(scale, np.float32).reshape(got.scale.shape).tobytes()
    assert codes.dtype.kind in "iu"


def test_search_picks_a_clipped_range_on_outliers() -> None:
    """Not only amax: on a heavy-tailed weight most groups clip (the search does something)."""
    spec = TensorSpec("int4", parse_granularity("group:32"), observer="mse")
    w = np.random.default_rng(3).standard_t(2, (256, 64)).astype(np.float32)
    searched = quantize_weight(w, spec, WeightLayout(1, 0))
    plain = quantize_weight(w, TensorSpec("int4", parse_granularity("group:32")), WeightLayout(1, 0))
    assert (np.asarray(searched.scale) < np.asarray(plain.scale)).mean() > 0.5
    err = ((np.asarray(searched.dequantized) - w) ** 2).sum()
    assert err < 0.9 * ((np.asarray(plain.dequantized) - w) ** 2).sum()
