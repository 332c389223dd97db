"""The error-driven range policies: ``mse`` (clipping-factor search, cf. AMCT IFMR) and
``histogram`` (tail trimming, cf. AMCT HFMG / torch ``HistogramObserver``).

Both score candidate ranges by the expected squared error of the target format's
``qdq(values, lo, hi)`` over the histogram (midpoint rule inside each bin). The searches pass
blocks of candidates to ``qdq`` at once when it broadcasts, and pick the same range, bit for bit,
as one call per candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np

from onnxcomp.calibration.histogram import (
    HistogramObserver,
    Observer,
    Range,
    abs_histogram,
    amax_of,
    as_histogram,
    check_option,
    require_data,
)

#: qdq(values float64, lo, hi) -> the values fake-quantized on the grid covering [lo, hi].
QDQ = Callable[[np.ndarray, float, float], np.ndarray]
#: The same called with lo/hi columns (C, 1), where it broadcasts: the (C, N) rows of C calls.
_BlockQDQ = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

_SAMPLES_PER_BIN = 4  # midpoint rule inside each bin for the expected-error integrals
_BLOCK = 1 << 16  # candidates x samples evaluated at once by the error searches


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
    values, weights = _samples(as_histogram(obs, "mse", need_data=True))
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
    check_option("steps", steps, 1, 10**6)
    require_data(obs)
    factors = np.arange(steps, 0, -1) / steps  # j / steps, correctly rounded as in Python
    if symmetric:
        return -factors * amax_of(obs), factors * amax_of(obs)
    return factors * obs.min_val, factors * obs.max_val


def shrink_candidates(obs: Observer, symmetric: bool = False, steps: int = 100) -> list[Range]:
    """The mse search grid, widest first: f*[min, max] (symmetric: f*[-amax, amax]), f = j/steps."""
    lo, hi = _shrink_bounds(obs, symmetric, steps)
    return [Range(a, b) for a, b in zip(lo.tolist(), hi.tolist())]


def mse_range(obs: HistogramObserver, qdq: QDQ, symmetric: bool = False, steps: int = 100) -> Range:
    """Clipping search (cf. AMCT IFMR): among :func:`shrink_candidates`, the range of least
    expected squared qdq error over the histogram (:func:`expected_error`)."""
    obs = as_histogram(obs, "mse", need_data=True)
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
        amax = amax_of(obs)
        occupied = np.flatnonzero(abs_histogram(obs))
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
    obs = as_histogram(obs, "histogram", need_data=True)
    lo, hi = _trim_bounds(obs, symmetric)
    return [Range(a, b) for a, b in zip(lo.tolist(), hi.tolist())]


def hist_error_range(obs: HistogramObserver, qdq: QDQ, symmetric: bool = False) -> Range:
    """HFMG-like: among :func:`trim_candidates`, the range of least expected qdq error."""
    obs = as_histogram(obs, "histogram", need_data=True)
    return _best(obs, qdq, *_trim_bounds(obs, symmetric))
