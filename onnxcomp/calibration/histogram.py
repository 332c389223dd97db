"""Activation statistics: an exact running min/max and an exact, mergeable histogram.

The two observers every calibration policy reads (:mod:`onnxcomp.calibration.observers` picks
the range from them), the :class:`Range` they produce, and the accessors the range searches
share (:func:`as_histogram`, :func:`abs_histogram`, :func:`threshold_range`, ...). An observer
accumulates what it is fed in memory independent of the number of batches, and two observers
merge exactly; float32 batches are binned in float32 (exactly) in cache-sized chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxcomp.errors import CalibrationError, ConfigError

_K_MIN = -160  # a fresh histogram's exponent floor: below float32's smallest subnormal 2^-149
_K_MAX = 512  # |x| >= 2^512 is rejected: keeps every power-of-two scaling exact (no under/overflow)
_CHUNK = 1 << 16  # elements binned at a time by the float32 path (stays in cache)


@dataclass(frozen=True)
class Range:
    """A closed activation range [lo, hi] (float64); not necessarily containing zero."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))


def check_option(name: str, value: Any, lo: float, hi: float, integer: bool = True) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} in [{lo:g}, {hi:g}], got {value!r}")


def _extremes(x: np.ndarray) -> tuple[float, float]:
    """Exact (min, max) of a non-empty array; CalibrationError if any value is NaN or Inf."""
    lo, hi = float(x.min()), float(x.max())  # NaN propagates through min/max, Inf is an extreme
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CalibrationError(f"non-finite values (NaN or Inf) among {x.size} values")
    return lo, hi


class MinMaxObserver:
    """Exact running minimum and maximum (torch.ao ``MinMaxObserver`` without the qparams)."""

    def __init__(self) -> None:
        self.min_val: float = math.inf
        self.max_val: float = -math.inf
        self.numel: int = 0

    def update(self, x: np.ndarray) -> None:
        """Fold one batch in; raises CalibrationError on NaN/Inf."""
        x = np.asarray(x)
        if x.size == 0:
            return
        lo, hi = _extremes(x)
        self.min_val, self.max_val = min(self.min_val, lo), max(self.max_val, hi)
        self.numel += int(x.size)

    def merge(self, other: MinMaxObserver) -> None:
        """Fold in another observer's statistics (exact, order-independent)."""
        if not isinstance(other, MinMaxObserver):
            raise TypeError(f"cannot merge {type(other).__name__} into MinMaxObserver")
        self.min_val, self.max_val = min(self.min_val, other.min_val), max(self.max_val, other.max_val)
        self.numel += other.numel

    def state_nbytes(self) -> int:
        """Bytes of statistics held (constant)."""
        return 24


class HistogramObserver:
    """Fixed-size histogram with exact min/max, mergeable bit-exactly in any batch order.

    The bins split the power-of-two range [-2^k, 2^k) into ``num_bins`` bins of width
    w = 2^(k+1)/num_bins; value x falls in bin num_bins/2 + floor(x/w). x/w is a power-of-two
    scaling, exact in float64 for every finite input, so the index does not depend on rounding.
    When a batch leaves the range, k grows and bins merge: bin i at level k lies wholly in bin
    (num_bins/2 + i)//2 at level k+1 (floor(floor(a)/2) = floor(a/2)), so the counts after any
    sequence of updates and merges equal those of one pass at the final k. Memory is O(num_bins).
    """

    def __init__(self, num_bins: int = 2048) -> None:
        check_option("num_bins", num_bins, 8, 2**24)
        if num_bins & (num_bins - 1):
            raise ConfigError(f"num_bins must be a power of two, got {num_bins!r}")
        self.num_bins = num_bins
        self._log2 = num_bins.bit_length() - 1
        self.k: int | None = None
        self.counts = np.zeros(num_bins, np.int64)
        self.min_val: float = math.inf
        self.max_val: float = -math.inf
        self.numel: int = 0
        self.zeros: int = 0  # exact zeros (ReLU outputs): the error model keeps them at 0

    @property
    def bin_width(self) -> float:
        """Width of one bin at the current exponent k."""
        if self.k is None:
            raise CalibrationError("the histogram has seen no data")
        return math.ldexp(1.0, self.k + 1 - self._log2)

    def edges(self) -> np.ndarray:
        """The num_bins + 1 bin edges, -2^k ... 2^k (float64, exact)."""
        return (np.arange(self.num_bins + 1, dtype=np.float64) - self.num_bins // 2) * self.bin_width

    def update(self, x: np.ndarray) -> None:
        """Fold one batch in; raises CalibrationError on NaN/Inf or |x| >= 2^512."""
        x = np.asarray(x)
        if x.size == 0:
            return
        lo, hi = _extremes(x)
        self._raise_to(max(_needed_k(lo, hi), _K_MIN if self.k is None else self.k))
        assert self.k is not None
        if x.dtype == np.float32 and self._log2 - self.k - 1 <= 127:  # 2^m is a float32
            counts, zeros = self._bin_float32(x.reshape(-1), lo, lo <= 0 <= hi)
        else:
            counts, zeros = self._bin_any(x, lo, lo <= 0 <= hi)
        self.counts += counts
        self.min_val, self.max_val = min(self.min_val, lo), max(self.max_val, hi)
        self.numel += int(x.size)
        self.zeros += zeros

    def _bin_any(self, x: np.ndarray, lo: float, count_zeros: bool) -> tuple[np.ndarray, int]:
        """Bin counts and exact zeros of any real array, computed in float64."""
        assert self.k is not None
        y = np.multiply(x, math.ldexp(1.0, self._log2 - self.k - 1), dtype=np.float64)
        np.floor(y, out=y)
        if lo < 0 and x.dtype.kind == "f" and x.dtype.itemsize >= 8:
            y[(y == 0) & (x < 0)] = -1.0  # a float64 subnormal may underflow to -0.0
        idx = y.astype(np.intp).ravel()
        idx += self.num_bins // 2
        zeros = int(np.count_nonzero(x == 0)) if count_zeros else 0
        return np.bincount(idx, minlength=self.num_bins), zeros

    def _bin_float32(self, flat: np.ndarray, lo: float, count_zeros: bool) -> tuple[np.ndarray, int]:
        """The float32 fast path: the same bins, in cache-sized chunks, without float64 copies.

        The caller ensures 2^m (m = log2 - k - 1) is a float32; it fails only for all-tiny data.
        x * 2^m is then exact in float32 unless the product is subnormal (|x| < 2^k bounds it by
        2^(log2-1), so it never overflows). A subnormal product is below 1, where floor only
        needs its sign; rounding keeps the sign except when a negative product underflows to
        -0.0 (possible only for m < 0), set back to -1 as in the float64 path. floor(y) + half is
        an integer in [0, num_bins] <= 2^24, exact in float32, and converted to the index directly.
        """
        assert self.k is not None
        m = self._log2 - self.k - 1
        factor = np.float32(math.ldexp(1.0, m))
        half = np.float32(self.num_bins // 2)
        fix = lo < 0 and m < 0
        chunk = min(_CHUNK, flat.size)
        y = np.empty(chunk, np.float32)
        idx = np.empty(chunk, np.intp)
        counts = np.zeros(self.num_bins, np.int64)
        zeros = 0
        for start in range(0, flat.size, chunk):
            xs = flat[start : start + chunk]
            ys, ids = y[: xs.size], idx[: xs.size]
            np.multiply(xs, factor, out=ys)
            np.floor(ys, out=ys)
            if fix:
                ys[(ys == 0) & (xs < 0)] = -1.0
            np.add(ys, half, out=ids, casting="unsafe")
            counts += np.bincount(ids, minlength=self.num_bins)
            if count_zeros:
                zeros += int(np.count_nonzero(xs == 0))
        return counts, zeros

    def merge(self, other: HistogramObserver) -> None:
        """Fold in another observer: both raised to the larger k, then counts added (exact)."""
        if not isinstance(other, HistogramObserver):
            raise TypeError(f"cannot merge {type(other).__name__} into HistogramObserver")
        if other.num_bins != self.num_bins:
            raise ConfigError(f"cannot merge a {other.num_bins}-bin histogram into a {self.num_bins}-bin one")
        if other.k is None:
            return
        k = other.k if self.k is None else max(self.k, other.k)
        self._raise_to(k)
        self.counts = self.counts + _fold(other.counts, k - other.k, self._log2)  # never aliases other
        self.min_val, self.max_val = min(self.min_val, other.min_val), max(self.max_val, other.max_val)
        self.numel += other.numel
        self.zeros += other.zeros

    def state_nbytes(self) -> int:
        """Bytes of statistics held: the counts plus a few scalars, whatever the batch count."""
        return int(self.counts.nbytes) + 40

    def _raise_to(self, k: int) -> None:
        if self.k is None:
            self.k = k
        elif k > self.k:
            self.counts = _fold(self.counts, k - self.k, self._log2)
            self.k = k


Observer = MinMaxObserver | HistogramObserver


def _needed_k(lo: float, hi: float) -> int:
    """Smallest k >= _K_MIN with -2^k <= lo and hi < 2^k."""
    k = _K_MIN
    if hi > 0:
        k = max(k, math.frexp(hi)[1])  # hi = m*2^e, m in [0.5, 1): hi < 2^e, hi >= 2^(e-1)
    if lo < 0:
        m, e = math.frexp(-lo)
        k = max(k, e - 1 if m == 0.5 else e)
    if k > _K_MAX:
        raise CalibrationError(f"values too large for a histogram (|x| >= 2^{_K_MAX})")
    return k


def _fold(counts: np.ndarray, d: int, log2: int) -> np.ndarray:
    """Counts raised d levels: bin half + j goes to half + floor(j / 2^d)."""
    if d <= 0:
        return counts.copy()
    block = 1 << min(d, log2 - 1)  # beyond log2-1 levels everything sits in the two middle bins
    folded = counts.reshape(-1, block).sum(axis=1)
    out = np.zeros_like(counts)
    start = counts.size // 2 - folded.size // 2
    out[start : start + folded.size] = folded
    return out


def require_data(obs: Observer) -> None:
    if obs.numel == 0:
        raise CalibrationError("the observer has seen no data; calibration produced no values for this tensor")


def as_histogram(obs: Observer, policy: str, need_data: bool = False) -> HistogramObserver:
    if not isinstance(obs, HistogramObserver):
        raise ConfigError(
            f"range policy {policy!r} needs a HistogramObserver; create it with make_observer({policy!r})"
        )
    if need_data:
        require_data(obs)
    return obs


def amax_of(obs: Observer) -> float:
    return max(-obs.min_val, obs.max_val)


def abs_histogram(obs: HistogramObserver) -> np.ndarray:
    """Counts of |x| over bins [m*w, (m+1)*w), m < num_bins/2 (the signed bins folded at 0)."""
    half = obs.num_bins // 2
    return obs.counts[half:] + obs.counts[half - 1 :: -1]


def threshold_range(obs: Observer, t: float, symmetric: bool) -> Range:
    """Range of an |x| threshold: (-t, t), or clipped to the data (lo=0 / hi=0 for one-signed data)."""
    if symmetric:
        return Range(-t, t)
    lo = 0.0 if obs.min_val >= 0 else max(obs.min_val, -t)
    hi = 0.0 if obs.max_val <= 0 else min(obs.max_val, t)
    return Range(lo, hi)
