"""Activation observers (streaming statistics) and range policies (statistics -> clipping range).

Statistics are kept apart from range choice, unlike ``torch.ao.quantization`` observers whose
``dtype``/``qscheme`` tie the statistics to an integer grid. An observer only accumulates what it
is fed, in memory independent of the number of batches, and two observers merge exactly. A *range
policy* turns the statistics into a :class:`Range`; error-driven policies see the target format
only through a ``qdq(values, lo, hi)`` callable, so the same search serves int8, int4 and FP8.

Policies: ``minmax`` (exact), ``percentile``, ``entropy`` (TensorRT's KL-divergence threshold
search, as in MXNet / onnxruntime), ``mse`` (clipping-factor search, cf. AMCT IFMR) and
``histogram`` (tail trimming, cf. AMCT HFMG / torch ``HistogramObserver``). Ranges are not forced
to contain zero; the quantizer does that when it derives scale and zero point.

The searches are vectorized yet pick the same range, bit for bit, as one call per candidate:
the error searches pass blocks of candidates to ``qdq`` at once (when it broadcasts), the KL
search estimates every threshold from prefix sums and recomputes exactly only the few that can
be the minimum, and float32 batches are binned in float32 (exactly) in cache-sized chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from onnxcomp.errors import CalibrationError, ConfigError

#: qdq(values float64, lo, hi) -> the values fake-quantized on the grid covering [lo, hi].
QDQ = Callable[[np.ndarray, float, float], np.ndarray]
#: The same called with lo/hi columns (C, 1), where it broadcasts: the (C, N) rows of C calls.
_BlockQDQ = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

OBSERVER_POLICIES = ("minmax", "percentile", "entropy", "mse", "histogram")

_K_MIN = -160  # a fresh histogram's exponent floor: below float32's smallest subnormal 2^-149
_K_MAX = 512  # |x| >= 2^512 is rejected: keeps every power-of-two scaling exact (no under/overflow)
_SAMPLES_PER_BIN = 4  # midpoint rule inside each bin for the expected-error integrals
_KL_EPS = 1e-4  # smoothing of empty bins in the KL search (as in MXNet / onnxruntime)
_CHUNK = 1 << 16  # elements binned at a time by the float32 path (stays in cache)
_BLOCK = 1 << 16  # candidates x samples evaluated at once by the error searches
_U = 2.0**-53  # unit roundoff of float64


@dataclass(frozen=True)
class Range:
    """A closed activation range [lo, hi] (float64); not necessarily containing zero."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))


def _check_option(name: str, value: Any, lo: float, hi: float, integer: bool = True) -> None:
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
        _check_option("num_bins", num_bins, 8, 2**24)
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


def _require_data(obs: Observer) -> None:
    if obs.numel == 0:
        raise CalibrationError("the observer has seen no data; calibration produced no values for this tensor")


def _as_hist(obs: Observer, policy: str, need_data: bool = False) -> HistogramObserver:
    if not isinstance(obs, HistogramObserver):
        raise ConfigError(
            f"range policy {policy!r} needs a HistogramObserver; create it with make_observer({policy!r})"
        )
    if need_data:
        _require_data(obs)
    return obs


def _amax(obs: Observer) -> float:
    return max(-obs.min_val, obs.max_val)


def _abs_hist(obs: HistogramObserver) -> np.ndarray:
    """Counts of |x| over bins [m*w, (m+1)*w), m < num_bins/2 (the signed bins folded at 0)."""
    half = obs.num_bins // 2
    return obs.counts[half:] + obs.counts[half - 1 :: -1]


def _threshold_range(obs: Observer, t: float, symmetric: bool) -> Range:
    """Range of an |x| threshold: (-t, t), or clipped to the data (lo=0 / hi=0 for one-signed data)."""
    if symmetric:
        return Range(-t, t)
    lo = 0.0 if obs.min_val >= 0 else max(obs.min_val, -t)
    hi = 0.0 if obs.max_val <= 0 else min(obs.max_val, t)
    return Range(lo, hi)


def minmax_range(obs: Observer, symmetric: bool = False) -> Range:
    """[min, max] of everything observed; symmetric: [-amax, amax]."""
    _require_data(obs)
    return Range(-_amax(obs), _amax(obs)) if symmetric else Range(obs.min_val, obs.max_val)


def _quantile(counts: np.ndarray, start: float, w: float, q: float, vmin: float, vmax: float) -> float:
    """The q-quantile (numpy's 'linear' rank q*(n-1)), elements spread evenly inside their bin."""
    if q <= 0:
        return vmin
    if q >= 1:
        return vmax
    cum = np.cumsum(counts)
    pos = q * (float(cum[-1]) - 1.0)
    b = int(np.searchsorted(cum, pos, side="right"))
    before = float(cum[b - 1]) if b else 0.0
    value = start + (b + (pos - before + 0.5) / float(counts[b])) * w
    return min(max(value, vmin), vmax)


def percentile_range(obs: HistogramObserver, percentile: float = 99.99, symmetric: bool = False) -> Range:
    """t = P(p) of |x| (100 - p percent of all values lie beyond it, both tails together);
    the range is [-t, t], or clipped to the data when asymmetric (ORT's semantics). Within a bin."""
    _check_option("percentile", percentile, 50, 100, integer=False)
    obs = _as_hist(obs, "percentile", need_data=True)
    t = _quantile(_abs_hist(obs), 0.0, obs.bin_width, percentile / 100.0, 0.0, _amax(obs))
    return _threshold_range(obs, t, symmetric)


def _smooth(p: np.ndarray, eps: float = _KL_EPS) -> np.ndarray | None:
    """Move eps of mass onto each empty bin, taken evenly from the others (MXNet/ORT)."""
    zero = p == 0
    n_zero = int(zero.sum())
    if n_zero == p.size:
        return None
    out = p + np.where(zero, eps, -eps * n_zero / (p.size - n_zero))
    return np.maximum(out, 1e-12)


def kl_divergence(hist: np.ndarray, i: int, num_quant_bins: int, tail: float | None = None) -> float:
    """KL(P || Q) of the threshold at bin ``i`` of an |x| histogram (TensorRT calibration).

    P = hist[:i] with the outliers hist[i:] added to its last bin; Q = hist[:i] merged into
    ``num_quant_bins`` groups of i // num_quant_bins bins (the last group takes the remainder),
    each group's count spread evenly over its bins where P is non-zero. Both are smoothed
    (:func:`_smooth`) and normalised; inf if either is all zero. ``tail`` (= hist[i:].sum()) and a
    float64 ``hist`` may be passed in by a caller scanning many thresholds.
    """
    sliced = np.asarray(hist[:i], dtype=np.float64)
    p = sliced.copy()
    p[-1] += float(hist[i:].sum()) if tail is None else tail
    nonzero = p != 0
    groups = np.minimum(np.arange(i) // (i // num_quant_bins), num_quant_bins - 1)
    sums = np.bincount(groups, weights=sliced, minlength=num_quant_bins)
    nnz = np.bincount(groups, weights=nonzero, minlength=num_quant_bins)
    q = np.where(nonzero, sums[groups] / np.maximum(nnz[groups], 1.0), 0.0)
    ps, qs = _smooth(p), _smooth(q)
    if ps is None or qs is None:
        return math.inf
    ps, qs = ps / ps.sum(), qs / qs.sum()
    return float(np.sum(ps * np.log(ps / qs)))


def asymmetric_quant_bins(obs: Observer, num_quant_bins: int) -> int:
    """Quantized bins for the |x| search under an asymmetric grid over [min, max].

    TensorRT's KL search assumes a symmetric grid: ``num_quant_bins`` levels for |x|. An
    asymmetric grid spends its levels over [min, max] instead, so the dominant side gets about
    2 * amax / (max - min) times as many (twice for one-signed data, e.g. after a Relu).
    """
    span = obs.max_val - obs.min_val
    if span <= 0:
        return num_quant_bins
    factor = min(2.0, max(1.0, 2.0 * _amax(obs) / span))
    return int(round(num_quant_bins * factor))


def entropy_range(obs: HistogramObserver, num_quant_bins: int = 128, symmetric: bool = False) -> Range:
    """KL-divergence threshold search on the |x| histogram (TensorRT 8-bit calibration, MXNet/ORT).

    Candidates t = i * w for i = num_quant_bins ... (last occupied |x| bin + 1); the one with the
    smallest :func:`kl_divergence` wins (the first on ties); t is capped at max |x|.
    """
    _check_option("num_quant_bins", num_quant_bins, 2, 2**24)
    obs = _as_hist(obs, "entropy", need_data=True)
    num_quant_bins = asymmetric_quant_bins(obs, num_quant_bins) if not symmetric else num_quant_bins
    hist, amax = _abs_hist(obs), _amax(obs)
    # Exact zeros (a Relu's spike) are exact on every grid: left out of the KL comparison, where
    # merging the spike with its neighbours would make every wide threshold look bad.
    hist = hist.copy()
    hist[0] -= obs.zeros
    occupied = np.flatnonzero(hist)
    if occupied.size == 0:  # nothing but zeros
        return _threshold_range(obs, amax, symmetric)
    n = int(occupied[-1]) + 1
    if n <= num_quant_bins:
        return _threshold_range(obs, amax, symmetric)
    t = min((num_quant_bins + _kl_argmin(hist.astype(np.float64), num_quant_bins, n)) * obs.bin_width, amax)
    return _threshold_range(obs, t, symmetric)


def _kl_argmin(hist64: np.ndarray, nq: int, n: int) -> int:
    """argmin over i = nq ... n of :func:`kl_divergence` (the first minimum), the same index.

    :func:`_kl_estimates` gives every candidate's divergence from prefix sums over the bins and
    per-group sums, O(nq) per candidate, with a bound on its distance to what
    :func:`kl_divergence` computes. Only the candidates whose interval reaches the lowest one can
    be the minimum; those alone are computed exactly, and the first exact minimum among them is
    the answer (every candidate attaining the exact minimum is among them).
    """
    tails = np.concatenate([np.cumsum(hist64[::-1])[::-1], [0.0]])  # tails[i] = hist[i:].sum()
    cands = np.arange(nq, n + 1)
    approx, bound = _kl_estimates(hist64[:n], tails, cands, nq)
    return _first_min(approx, bound, lambda c: kl_divergence(hist64, int(cands[c]), nq, float(tails[cands[c]])))


def _first_min(approx: np.ndarray, bound: np.ndarray, exact: Callable[[int], float]) -> int:
    """np.argmin of [exact(c) for every c], given |exact(c) - approx[c]| <= bound[c]: exact
    is called only where the interval reaches below the lowest upper end (everywhere if that is inf)."""
    close = np.flatnonzero(approx - bound <= np.min(approx + bound))
    return int(close[int(np.argmin([exact(int(c)) for c in close]))])


def _kl_estimates(h: np.ndarray, tails: np.ndarray, i: np.ndarray, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`kl_divergence` of the thresholds ``i`` (ascending, bins of counts ``h``, the last
    one occupied), each to within the returned bound (an inf divergence is exact: bound 0; one
    not estimated is 0 +- inf).

    With a_j, b_j the smoothed P and Q before normalisation and Sp, Sq their sums,
    KL = sum_j a_j (log a_j - log b_j) / Sp + log(Sq / Sp); P's empty bins are empty in Q too
    (a = b = eps) and add nothing to the sum. On P's occupied bins below the last one,
    a_j = h_j + dp, one dp per candidate (the smoothing), so sum a log a is the Taylor series
    sum h log h + dp sum (log h + 1) + dp^2/2 sum 1/h - dp^3/6 sum 1/h^2 + dp^4/12 sum 1/h^3 of
    prefix sums (h >= 1, |dp| <= 1/2: remainder <= |dp|^5/20 * count / (1 - |dp|)^4). Q is
    constant on each group, so sum a log b takes one term per group; candidates with the same
    group width m = i // nq share all groups but the last. The bound is the Taylor remainder
    plus a generous multiple of the rounding in both computations, 64 u (n + nq + 16) times the
    magnitudes summed (the terms' and the sums').
    """
    k = i - 1  # P's bins below the last one, which also holds the tail
    occupied = h != 0
    safe_h = np.where(occupied, h, 1.0)
    log_h = np.log(safe_h)
    inv_h = np.where(occupied, 1.0 / safe_h, 0.0)
    cum_h = np.concatenate([[0.0], np.cumsum(h)])  # integer counts: exact
    cum_nz = np.concatenate([[0], np.cumsum(occupied)])
    inv_h2 = inv_h * inv_h
    p_f, p_log, p_inv, p_inv2, p_inv3 = (
        np.concatenate([[0.0], np.cumsum(v)]) for v in (h * log_h, log_h, inv_h, inv_h2, inv_h2 * inv_h)
    )
    size = i.astype(np.float64)
    last = h[k] + tails[i]  # P's last bin
    last_on = last != 0
    cnt = cum_nz[k]  # occupied bins of P below the last
    zp = (k - cnt) + ~last_on
    log_eps = math.log(_KL_EPS)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        dp = (-_KL_EPS * zp) / (size - zp)
        adp = np.abs(dp)
        a_last = np.where(last_on, np.maximum(last + dp, 1e-12), _KL_EPS)
        sp = cum_h[k] + cnt * dp + (k - cnt) * _KL_EPS + a_last
        aloga_last = np.where(last_on, a_last * np.log(a_last), 0.0)
        s1 = p_f[k] + dp * (p_log[k] + cnt) + dp**2 / 2 * p_inv[k] - dp**3 / 6 * p_inv2[k] + dp**4 / 12 * p_inv3[k]
        s1 += aloga_last
        mag1 = p_f[k] + adp * (p_log[k] + cnt) + adp**2 * p_inv[k] + adp**3 * p_inv2[k] + adp**4 * p_inv3[k]
        mag1 += np.abs(aloga_last)
        remainder = adp**5 / 20 * cnt / (1 - adp) ** 4
        # Q: hist[:i] (no tail) in nq groups of m bins, the last taking the rest, each group's
        # sum spread evenly over its bins where P is non-zero (q = sums / max(nnz, 1), else 0)
        m = i // nq
        start = (nq - 1) * m  # the last group: [start, i)
        last_sum = cum_h[i] - cum_h[start]
        last_nnz = (cum_nz[k] - cum_nz[start]) + last_on
        last_avg = last_sum / np.maximum(last_nnz, 1.0)
        last_on_q = last_avg != 0
        zq = (size - start) - last_on_q * last_nnz
        s2, mag2, sq = np.zeros(i.size), np.zeros(i.size), np.zeros(i.size)
        groups = []  # per width m: rows, and the regular groups' P mass, occupied count, average
        for width in np.unique(m):
            rows = np.flatnonzero(m == width)
            edges = np.arange(nq) * int(width)
            g_sum = np.diff(cum_h[edges])
            g_nnz = np.diff(cum_nz[edges]).astype(np.float64)
            on = g_nnz > 0
            g_sum, g_nnz = g_sum[on], g_nnz[on]
            zq[rows] += (nq - 1) * int(width) - g_nnz.sum()
            groups.append((rows, g_sum, g_nnz, g_sum / g_nnz))
        dq = (-_KL_EPS * zq) / (size - zq)
        for rows, g_sum, g_nnz, g_avg in groups:
            log_b = np.log(np.maximum(g_avg + dq[rows, None], 1e-12))
            mass = g_sum + dp[rows, None] * g_nnz  # sum of a over the group's occupied bins
            s2[rows] = (mass * log_b).sum(axis=1)
            mag2[rows] = (mass * np.abs(log_b)).sum(axis=1)
            sq[rows] = (g_nnz * (g_avg + dq[rows, None])).sum(axis=1)
        b_last = np.maximum(last_avg + dq, 1e-12)
        log_b_last = np.where(last_on_q, np.log(np.where(last_on_q, b_last, 1.0)), log_eps)
        mass_last = (cum_h[k] - cum_h[start]) + dp * (cum_nz[k] - cum_nz[start]) + np.where(last_on, a_last, 0.0)
        s2 += mass_last * log_b_last  # with b = eps for P's last bin alone in an empty group
        mag2 += mass_last * np.abs(log_b_last)
        sq += np.where(last_on_q, last_nnz * b_last, 0.0) + zq * _KL_EPS
        kl = (s1 - s2) / sp + (np.log(sq) - np.log(sp))
        zero_bins = 2 * (zp + zq) * _KL_EPS * -log_eps
        scale = (mag1 + mag2 + zero_bins + sp + sq) / sp + np.abs(np.log(sp)) + np.abs(np.log(sq)) + 1.0
        bound = 64.0 * (size + nq + 16.0) * _U * scale + 2.0 * remainder / sp
    unknown = ~(adp <= 0.5) | ~(np.abs(dq) <= 0.5) | ~np.isfinite(bound) | ~np.isfinite(kl)
    kl[unknown], bound[unknown] = 0.0, math.inf  # not estimated: [-inf, inf]
    infinite = (zp == size) | (zq == size)
    kl[infinite], bound[infinite] = math.inf, 0.0
    return kl, bound


def _samples(obs: HistogramObserver) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint-rule sample points and weights: each occupied bin (clipped to [min, max]) cut in
    _SAMPLES_PER_BIN equal parts carrying count/_SAMPLES_PER_BIN each (uniform density in a bin);
    exact zeros are one point at 0, not spread over the bin [0, w)."""
    occupied = np.flatnonzero(obs.counts)
    edges = obs.edges()
    lo = np.maximum(edges[occupied], obs.min_val)
    hi = np.minimum(edges[occupied + 1], obs.max_val)
    frac = (np.arange(_SAMPLES_PER_BIN) + 0.5) / _SAMPLES_PER_BIN
    values = (lo[:, None] + (hi - lo)[:, None] * frac[None, :]).ravel()
    counts = obs.counts[occupied].astype(np.float64)
    counts[occupied == obs.num_bins // 2] -= obs.zeros
    weights = np.repeat(counts / _SAMPLES_PER_BIN, _SAMPLES_PER_BIN)
    if obs.zeros:
        values, weights = np.append(values, 0.0), np.append(weights, float(obs.zeros))
    return values, weights


def expected_error(obs: HistogramObserver, qdq: QDQ, rng: Range) -> float:
    """Mean squared error of qdq over the observed distribution (clipping included)."""
    values, weights = _samples(_as_hist(obs, "mse", need_data=True))
    return _error(values, weights, qdq, rng)


def _error(values: np.ndarray, weights: np.ndarray, qdq: QDQ, rng: Range) -> float:
    diff = np.asarray(qdq(values, rng.lo, rng.hi), np.float64) - values
    return float(np.dot(weights, diff * diff) / weights.sum())


def _errors(values: np.ndarray, weights: np.ndarray, qdq: QDQ, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """:func:`_error` of every candidate [lo[c], hi[c]], the same floats.

    A ``qdq`` built on numpy broadcasting (like :func:`onnxcomp.quant.qparams.range_qdq`) also
    takes lo/hi columns of shape (C, 1) and returns the (C, N) rows of C scalar calls: one call
    then serves a block of candidates, which is where the time goes otherwise (a scalar call
    costs far more in Python than in arithmetic). Such a block result is used only if it has the
    right shape and its first and last rows equal, bit for bit, the scalar calls for the first and
    last candidates; else (or if the call raises) every candidate is evaluated one by one.
    """
    count = lo.size
    wsum = weights.sum()
    first = np.asarray(qdq(values, float(lo[0]), float(hi[0])), np.float64)
    if count == 1:
        return np.array([_sq_error(first - values, weights, wsum)])
    last = np.asarray(qdq(values, float(lo[-1]), float(hi[-1])), np.float64)
    grid_of = getattr(qdq, "integer_grid", None)
    grid = grid_of(lo, hi) if grid_of is not None else None
    if grid is not None:
        found = _grid_errors(values, weights, wsum, grid, first, last)
        if found is not None:
            return found
    out = np.empty(count)
    rows = max(2, _BLOCK // max(values.size, 1))
    block_qdq = cast(_BlockQDQ, qdq)
    buffer = np.empty((min(rows, count), values.size))
    try:
        for start in range(0, count, rows):
            stop = min(start + rows, count)
            block = np.asarray(block_qdq(values, lo[start:stop, None], hi[start:stop, None]), np.float64)
            if block.shape != (stop - start, values.size):
                raise ValueError("not a block of rows")
            if start == 0 and not _same_bits(block[0], first):
                raise ValueError("block rows differ from scalar calls")
            if stop == count and not _same_bits(block[-1], last):
                raise ValueError("block rows differ from scalar calls")
            diff = np.subtract(block, values, out=buffer[: stop - start])
            diff *= diff
            for row in range(stop - start):
                out[start + row] = np.dot(weights, diff[row]) / wsum
        return out
    except Exception:  # noqa: BLE001 - a qdq for scalar ranges only: one call per candidate
        return np.array([_error(values, weights, qdq, Range(a, b)) for a, b in zip(lo.tolist(), hi.tolist())])


def _grid_errors(
    values: np.ndarray,
    weights: np.ndarray,
    wsum: float,
    grid: tuple[np.ndarray, np.ndarray, float, float],
    first: np.ndarray,
    last: np.ndarray,
) -> np.ndarray | None:
    """:func:`_errors` on integer grids (``qdq.integer_grid``: per candidate a float32 scale and
    zero point): ``(clip(rint(x / s) + z, qmin, qmax) - z) * s`` in one float32 buffer per block,
    no codes array, no copies. The first and last rows must equal the scalar calls bit for bit
    (as the block path's), else None and the caller evaluates the other way."""
    scale, zero, qmin, qmax = grid
    count = scale.size
    x32 = values.astype(np.float32)  # what quantize rounds the values to
    rows = max(2, _BLOCK // max(values.size, 1))
    q = np.empty((min(rows, count), values.size), np.float32)
    diff = np.empty(q.shape)
    out = np.empty(count)
    for start in range(0, count, rows):
        stop = min(start + rows, count)
        s, z = scale[start:stop, None], zero[start:stop, None]
        qb, db = q[: stop - start], diff[: stop - start]
        with np.errstate(over="ignore"):  # |x / scale| beyond float32 -> +-inf, clipped below
            np.divide(x32, s, out=qb)
        np.rint(qb, out=qb)
        np.add(qb, z, out=qb)
        np.clip(qb, qmin, qmax, out=qb)
        np.subtract(qb, z, out=qb)  # exact: integers below 2^24
        np.multiply(qb, s, out=qb)
        np.subtract(qb, values, out=db)  # float32 -> float64 exactly, as qdq's astype
        if start == 0 and not _same_bits(db[0], first - values):
            return None
        if stop == count and not _same_bits(db[-1], last - values):
            return None
        db *= db
        for row in range(stop - start):
            out[start + row] = np.dot(weights, db[row]) / wsum
    return out


def _sq_error(diff: np.ndarray, weights: np.ndarray, wsum: float) -> float:
    return float(np.dot(weights, diff * diff) / wsum)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint64), b.view(np.uint64)))


def _best(obs: HistogramObserver, qdq: QDQ, lo: np.ndarray, hi: np.ndarray) -> Range:
    values, weights = _samples(obs)
    c = int(np.argmin(_errors(values, weights, qdq, lo, hi)))  # first minimum: the widest of equals
    return Range(lo[c], hi[c])


def _shrink_bounds(obs: Observer, symmetric: bool, steps: int) -> tuple[np.ndarray, np.ndarray]:
    _check_option("steps", steps, 1, 10**6)
    _require_data(obs)
    factors = np.arange(steps, 0, -1) / steps  # j / steps, correctly rounded as in Python
    if symmetric:
        return -factors * _amax(obs), factors * _amax(obs)
    return factors * obs.min_val, factors * obs.max_val


def shrink_candidates(obs: Observer, symmetric: bool = False, steps: int = 100) -> list[Range]:
    """The mse search grid, widest first: f*[min, max] (symmetric: f*[-amax, amax]), f = j/steps."""
    lo, hi = _shrink_bounds(obs, symmetric, steps)
    return [Range(a, b) for a, b in zip(lo.tolist(), hi.tolist())]


def mse_range(obs: HistogramObserver, qdq: QDQ, symmetric: bool = False, steps: int = 100) -> Range:
    """Clipping search (cf. AMCT IFMR): among :func:`shrink_candidates`, the range of least
    expected squared qdq error over the histogram (:func:`expected_error`)."""
    obs = _as_hist(obs, "mse", need_data=True)
    return _best(obs, qdq, *_shrink_bounds(obs, symmetric, steps))


def _trim_bounds(obs: HistogramObserver, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`trim_candidates` as (lo, hi) arrays, without a loop over the bins.

    Symmetric: the thresholds are the occupied |x| bins' right edges, outermost first, while the
    span stays large enough. Asymmetric: each trimming step compares the outermost occupied
    bins of both tails by key (count, signed edge), dropping the left one if its key is smaller.
    Run on the two sequences (from the left: count, left edge; from the right: count, -right
    edge), that is a merge of them, and a merge of unsorted sequences takes the same turns as the
    merge of their running maxima (an element below its side's running maximum is dropped right
    after that maximum, since it is below what stopped the maximum too). The running maxima are
    sorted, so the step at which the left side's element i goes is i plus the number of right
    running maxima <= its own (searchsorted); the left pointer after each step follows by cumsum.
    """
    w = obs.bin_width
    if symmetric:
        amax = _amax(obs)
        occupied = np.flatnonzero(_abs_hist(obs))
        span0 = int(occupied[-1]) + 1
        inner = occupied[-2::-1]
        inner = inner[4 * (inner + 1) >= span0]  # descending, so a prefix: the loop's break
        t = (inner + 1) * w
        t = np.where(amax < t, amax, t)  # Python's min(t, amax), -0.0 and all
        return np.concatenate([[-amax], -t]), np.concatenate([[amax], t])
    counts, edges = obs.counts, obs.edges()
    occupied = np.flatnonzero(counts)
    size = occupied.size
    span0 = int(occupied[-1] - occupied[0]) + 1
    left_lo, right_hi = np.array([obs.min_val]), np.array([obs.max_val])
    if size < 2:
        return left_lo, right_hi
    # ranks of the keys (count, left edge) from the left and (count, -right edge) from the right
    key_count = np.concatenate([counts[occupied], counts[occupied[::-1]]])
    key_edge = np.concatenate([edges[occupied], -edges[occupied[::-1] + 1]])
    order = np.lexsort((key_edge, key_count))
    sorted_count, sorted_edge = key_count[order], key_edge[order]
    new = np.concatenate([[True], (np.diff(sorted_count) != 0) | (np.diff(sorted_edge) != 0)])
    rank = np.empty(2 * size, np.int64)
    rank[order] = np.cumsum(new)
    left_max = np.maximum.accumulate(rank[:size])
    right_max = np.maximum.accumulate(rank[size:])
    step_of_left = np.arange(size) + np.searchsorted(right_max, left_max, side="right")  # 0-based
    dropped_left = np.zeros(2 * size, np.int64)
    dropped_left[step_of_left] = 1
    steps = np.arange(1, size)  # the loop runs until the pointers meet: size - 1 steps
    i = np.cumsum(dropped_left)[: size - 1]  # left elements dropped after each step
    j = size - 1 - (steps - i)
    a, b = occupied[i], occupied[j]
    keep = 4 * (b - a + 1) >= span0  # the span shrinks: a prefix, up to the loop's break
    a, b = a[keep], b[keep]
    lo = np.where(obs.min_val > edges[a], obs.min_val, edges[a])  # Python's max(edge, min)
    hi = np.where(obs.max_val < edges[b + 1], obs.max_val, edges[b + 1])  # and min(edge, max)
    return np.concatenate([left_lo, lo]), np.concatenate([right_hi, hi])


def trim_candidates(obs: HistogramObserver, symmetric: bool = False) -> list[Range]:
    """The histogram search grid (cf. AMCT HFMG, torch HistogramObserver), widest first.

    Starting from [min, max], repeatedly drop the outermost occupied bin of the sparser tail (the
    one holding fewer values; on a tie the one farther from zero) until the occupied span is below
    a quarter of the original. Each step gives [max(left edge, min), min(right edge, max)].
    Symmetric: the same on the |x| histogram (one tail), giving [-t, t].
    """
    obs = _as_hist(obs, "histogram", need_data=True)
    lo, hi = _trim_bounds(obs, symmetric)
    return [Range(a, b) for a, b in zip(lo.tolist(), hi.tolist())]


def hist_error_range(obs: HistogramObserver, qdq: QDQ, symmetric: bool = False) -> Range:
    """HFMG-like: among :func:`trim_candidates`, the range of least expected qdq error."""
    obs = _as_hist(obs, "histogram", need_data=True)
    return _best(obs, qdq, *_trim_bounds(obs, symmetric))


#: policy -> (observer options, range options)
_OPTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "minmax": ((), ()),
    "percentile": (("num_bins",), ("percentile",)),
    "entropy": (("num_bins",), ("num_quant_bins",)),
    "mse": (("num_bins",), ("steps",)),
    "histogram": (("num_bins",), ()),
}


def _check_options(policy: str, options: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if policy not in _OPTIONS:
        raise ConfigError(f"unknown calibration policy {policy!r}; use one of {', '.join(OBSERVER_POLICIES)}")
    stat, rng = _OPTIONS[policy]
    unknown = sorted(set(options) - set(stat) - set(rng))
    if unknown:
        valid = ", ".join(stat + rng) or "none"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for calibration policy {policy!r}; valid: {valid}")
    return stat, rng


def make_observer(policy: str, **options: Any) -> Observer:
    """A fresh observer for ``policy``: MinMaxObserver for minmax, else HistogramObserver(num_bins).

    Accepts the policy's range options too (ignored here), so one option dict serves both calls.
    """
    _check_options(policy, options)
    if policy == "minmax":
        return MinMaxObserver()
    return HistogramObserver(options.get("num_bins", 2048))


def compute_range(policy: str, obs: Observer, qdq: QDQ | None, symmetric: bool, **options: Any) -> Range:
    """The range ``policy`` picks from ``obs``; ``qdq`` is needed by mse and histogram.

    Accepts the policy's observer options too (ignored here). Unknown policy/option: ConfigError.
    """
    _, rng_keys = _check_options(policy, options)
    kwargs = {k: v for k, v in options.items() if k in rng_keys}
    if policy == "minmax":
        return minmax_range(obs, symmetric)
    if policy == "percentile":
        return percentile_range(_as_hist(obs, policy), symmetric=symmetric, **kwargs)
    if policy == "entropy":
        hist = _as_hist(obs, policy)
        proposal = entropy_range(hist, symmetric=symmetric, **kwargs)
        if qdq is None:
            return proposal
        # The KL threshold can over-clip sparse CNN activations; keep it only where it lowers
        # the expected quantization error of the real grid (else the full range).
        full = minmax_range(hist, symmetric)
        return proposal if expected_error(hist, qdq, proposal) < expected_error(hist, qdq, full) else full
    if qdq is None:
        raise ConfigError(f"range policy {policy!r} needs a qdq function to measure quantization error")
    if policy == "mse":
        return mse_range(_as_hist(obs, policy), qdq, symmetric=symmetric, **kwargs)
    return hist_error_range(_as_hist(obs, policy), qdq, symmetric=symmetric)
