"""The entropy range policy: TensorRT's KL-divergence threshold search (as in MXNet / onnxruntime).

Vectorized yet picking the same threshold, bit for bit, as one :func:`kl_divergence` call per
candidate: every threshold's divergence is estimated from prefix sums with an error bound, and
only the few that can be the minimum are recomputed exactly (:func:`_kl_argmin`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from onnxcomp.calibration.histogram import (
    HistogramObserver,
    Observer,
    Range,
    abs_histogram,
    amax_of,
    as_histogram,
    check_option,
    threshold_range,
)

_KL_EPS = 1e-4  # smoothing of empty bins in the KL search (as in MXNet / onnxruntime)
_U = 2.0**-53  # unit roundoff of float64


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
    factor = min(2.0, max(1.0, 2.0 * amax_of(obs) / span))
    return int(round(num_quant_bins * factor))


def entropy_range(obs: HistogramObserver, num_quant_bins: int = 128, symmetric: bool = False) -> Range:
    """KL-divergence threshold search on the |x| histogram (TensorRT 8-bit calibration, MXNet/ORT).

    Candidates t = i * w for i = num_quant_bins ... (last occupied |x| bin + 1); the one with the
    smallest :func:`kl_divergence` wins (the first on ties); t is capped at max |x|.
    """
    check_option("num_quant_bins", num_quant_bins, 2, 2**24)
    obs = as_histogram(obs, "entropy", need_data=True)
    num_quant_bins = asymmetric_quant_bins(obs, num_quant_bins) if not symmetric else num_quant_bins
    hist, amax = abs_histogram(obs), amax_of(obs)
    # Exact zeros (a Relu's spike) are exact on every grid: left out of the KL comparison, where
    # merging the spike with its neighbours would make every wide threshold look bad.
    hist = hist.copy()
    hist[0] -= obs.zeros
    occupied = np.flatnonzero(hist)
    if occupied.size == 0:  # nothing but zeros
        return threshold_range(obs, amax, symmetric)
    n = int(occupied[-1]) + 1
    if n <= num_quant_bins:
        return threshold_range(obs, amax, symmetric)
    t = min((num_quant_bins + _kl_argmin(hist.astype(np.float64), num_quant_bins, n)) * obs.bin_width, amax)
    return threshold_range(obs, t, symmetric)


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
