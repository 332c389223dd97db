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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxcomp.errors import CalibrationError, ConfigError

#: qdq(values float64, lo, hi) -> the values fake-quantized on the grid covering [lo, hi].
QDQ = Callable[[np.ndarray, float, float], np.ndarray]

OBSERVER_POLICIES = ("minmax", "percentile", "entropy", "mse", "histogram")

_K_MIN = -160  # a fresh histogram's exponent floor: below float32's smallest subnormal 2^-149
_K_MAX = 512  # |x| >= 2^512 is rejected: keeps every power-of-two scaling exact (no under/overflow)
_SAMPLES_PER_BIN = 4  # midpoint rule inside each bin for the expected-error integrals
_KL_EPS = 1e-4  # smoothing of empty bins in the KL search (as in MXNet / onnxruntime)


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
        y = np.multiply(x, math.ldexp(1.0, self._log2 - self.k - 1), dtype=np.float64)
        np.floor(y, out=y)
        if lo < 0 and x.dtype.kind == "f" and x.dtype.itemsize >= 8:
            y[(y == 0) & (x < 0)] = -1.0  # a float64 subnormal may underflow to -0.0
        idx = y.astype(np.intp).ravel()
        idx += self.num_bins // 2
        self.counts += np.bincount(idx, minlength=self.num_bins)
        self.min_val, self.max_val = min(self.min_val, lo), max(self.max_val, hi)
        self.numel += int(x.size)
        if lo <= 0 <= hi:
            self.zeros += int(np.count_nonzero(x == 0))

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
    hist64 = hist.astype(np.float64)
    tails = np.concatenate([np.cumsum(hist64[::-1])[::-1], [0.0]])  # tails[i] = hist[i:].sum()
    divs = [kl_divergence(hist64, i, num_quant_bins, float(tails[i])) for i in range(num_quant_bins, n + 1)]
    t = min((num_quant_bins + int(np.argmin(divs))) * obs.bin_width, amax)
    return _threshold_range(obs, t, symmetric)


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


def _best(obs: HistogramObserver, qdq: QDQ, candidates: list[Range]) -> Range:
    values, weights = _samples(obs)
    errors = [_error(values, weights, qdq, c) for c in candidates]
    return candidates[int(np.argmin(errors))]  # first minimum: the widest of equals


def shrink_candidates(obs: Observer, symmetric: bool = False, steps: int = 100) -> list[Range]:
    """The mse search grid, widest first: f*[min, max] (symmetric: f*[-amax, amax]), f = j/steps."""
    _check_option("steps", steps, 1, 10**6)
    _require_data(obs)
    factors = [j / steps for j in range(steps, 0, -1)]
    if symmetric:
        return [Range(-f * _amax(obs), f * _amax(obs)) for f in factors]
    return [Range(f * obs.min_val, f * obs.max_val) for f in factors]


def mse_range(obs: HistogramObserver, qdq: QDQ, symmetric: bool = False, steps: int = 100) -> Range:
    """Clipping search (cf. AMCT IFMR): among :func:`shrink_candidates`, the range of least
    expected squared qdq error over the histogram (:func:`expected_error`)."""
    obs = _as_hist(obs, "mse", need_data=True)
    return _best(obs, qdq, shrink_candidates(obs, symmetric, steps))


def trim_candidates(obs: HistogramObserver, symmetric: bool = False) -> list[Range]:
    """The histogram search grid (cf. AMCT HFMG, torch HistogramObserver), widest first.

    Starting from [min, max], repeatedly drop the outermost occupied bin of the sparser tail (the
    one holding fewer values; on a tie the one farther from zero) until the occupied span is below
    a quarter of the original. Each step gives [max(left edge, min), min(right edge, max)].
    Symmetric: the same on the |x| histogram (one tail), giving [-t, t].
    """
    obs = _as_hist(obs, "histogram", need_data=True)
    w = obs.bin_width
    if symmetric:
        amax = _amax(obs)
        occupied = np.flatnonzero(_abs_hist(obs))
        span0 = int(occupied[-1]) + 1
        out = [Range(-amax, amax)]
        for b in occupied[-2::-1]:
            if 4 * (int(b) + 1) < span0:
                break
            t = min((int(b) + 1) * w, amax)
            out.append(Range(-t, t))
        return out
    counts, edges = obs.counts, obs.edges()
    occupied = np.flatnonzero(counts)
    i, j = 0, occupied.size - 1
    span0 = int(occupied[j] - occupied[i]) + 1
    out = [Range(obs.min_val, obs.max_val)]
    while i < j:
        left, right = occupied[i], occupied[j]
        if counts[left] < counts[right] or (counts[left] == counts[right] and -edges[left] > edges[right + 1]):
            i += 1
        else:
            j -= 1
        a, b = occupied[i], occupied[j]
        if 4 * int(b - a + 1) < span0:
            break
        out.append(Range(max(float(edges[a]), obs.min_val), min(float(edges[b + 1]), obs.max_val)))
    return out


def hist_error_range(obs: HistogramObserver, qdq: QDQ, symmetric: bool = False) -> Range:
    """HFMG-like: among :func:`trim_candidates`, the range of least expected qdq error."""
    obs = _as_hist(obs, "histogram", need_data=True)
    return _best(obs, qdq, trim_candidates(obs, symmetric))


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
