"""Observers and range policies against brute-force numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

import onnxcomp.calibration.error_search as error_mod
import onnxcomp.calibration.histogram as histogram_mod
import onnxcomp.calibration.kl_search as kl_mod
from onnxcomp.calibration.error_search import expected_error, shrink_candidates, trim_candidates
from onnxcomp.calibration.observers import (
    OBSERVER_POLICIES,
    HistogramObserver,
    MinMaxObserver,
    Range,
    compute_range,
    entropy_range,
    hist_error_range,
    make_observer,
    minmax_range,
    mse_range,
    percentile_range,
)
from onnxcomp.errors import CalibrationError, ConfigError


def qdq_int8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Symmetric int8: scale = max(|lo|, |hi|) / 127, round half to even, clip to [-127, 127]."""
    scale = max(abs(lo), abs(hi)) / 127.0
    if scale == 0:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip(np.round(np.asarray(values, np.float64) / scale), -127, 127) * scale


def true_mse(x: np.ndarray, r: Range) -> float:
    x = x.astype(np.float64)
    return float(np.mean((qdq_int8(x, r.lo, r.hi) - x) ** 2))


def observe(x: np.ndarray, num_bins: int = 2048, parts: int = 1) -> HistogramObserver:
    obs = HistogramObserver(num_bins)
    for chunk in np.array_split(x, parts):
        obs.update(chunk)
    return obs


def assert_same_state(a: MinMaxObserver | HistogramObserver, b: MinMaxObserver | HistogramObserver) -> None:
    assert (a.min_val, a.max_val, a.numel) == (b.min_val, b.max_val, b.numel)
    if isinstance(a, HistogramObserver):
        assert isinstance(b, HistogramObserver)
        assert (a.k, a.zeros) == (b.k, b.zeros)
        assert np.array_equal(a.counts, b.counts)


RNG = np.random.default_rng(1234)
DISTRIBUTIONS = {
    "normal": (RNG.standard_normal(200_000) * 0.7 + 0.1).astype(np.float32),
    "laplace": RNG.laplace(size=200_000).astype(np.float32),
    "relu": np.maximum(RNG.standard_normal(200_000), 0).astype(np.float32) * 3.0,
    "uniform": RNG.uniform(-2.0, 5.0, 200_000).astype(np.float32),
}


# ------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("parts", [1, 7])
def test_minmax_exact(parts: int) -> None:
    x = DISTRIBUTIONS["normal"]
    mm, hist = MinMaxObserver(), HistogramObserver()
    for chunk in np.array_split(x, parts):
        mm.update(chunk)
        hist.update(chunk)
    for obs in (mm, hist):
        assert (obs.min_val, obs.max_val, obs.numel) == (float(x.min()), float(x.max()), x.size)
        assert minmax_range(obs) == Range(float(x.min()), float(x.max()))
        m = float(np.abs(x).max())
        assert minmax_range(obs, symmetric=True) == Range(-m, m)
        assert compute_range("minmax", obs, None, False) == minmax_range(obs)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_histogram_counts_brute_force(name: str) -> None:
    x = DISTRIBUTIONS[name]
    obs = observe(x, 1024, parts=5)
    k = obs.k
    assert k is not None and -(2.0**k) <= x.min() and x.max() < 2.0**k  # the range holds the data
    assert not (-(2.0 ** (k - 1)) <= x.min() and x.max() < 2.0 ** (k - 1))  # and k is the smallest such
    w = 2.0 ** (k + 1) / 1024
    expected = np.bincount((np.floor(x.astype(np.float64) / w) + 512).astype(int), minlength=1024)
    assert np.array_equal(obs.counts, expected)
    assert obs.edges()[0] == -(2.0**k) and obs.edges()[-1] == 2.0**k and obs.bin_width == w


def _parts(x: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return np.split(x, cuts)


@pytest.mark.parametrize("cls", [MinMaxObserver, HistogramObserver])
def test_merge_is_exact(cls: type) -> None:
    rng = np.random.default_rng(7)
    # ranges that grow (and shrink) across batches: k changes several times, both signs
    x = np.concatenate(
        [
            rng.standard_normal(5000) * 1e-3,
            rng.laplace(size=5000) * 10,
            rng.uniform(0, 1, 5000),
            rng.standard_normal(5000) * 1e4,
            np.array([2.0**20, -(2.0**20), 0.0, -0.0, 1e-30, -1e-30]),
        ]
    ).astype(np.float32)
    single = cls()
    single.update(x)
    halves = np.array_split(x, 2)
    uneven = _parts(x, [17, 12000])
    for pieces in (halves, uneven, uneven[::-1], [uneven[1], uneven[2], uneven[0]]):
        observers = [cls() for _ in pieces]
        for obs, piece in zip(observers, pieces, strict=True):
            for batch in np.array_split(piece, 3):  # several updates each
                obs.update(batch)
        merged = observers[0]
        for other in observers[1:]:
            merged.merge(other)
        assert_same_state(merged, single)
    # sequential updates in a shuffled batch order equal one update of everything
    seq = cls()
    for i in rng.permutation(20):
        seq.update(np.array_split(x, 20)[i])
    assert_same_state(seq, single)
    # merging into / from an empty observer
    empty = cls()
    empty.merge(single)
    assert_same_state(empty, single)
    single.merge(cls())
    assert_same_state(empty, single)


def test_merge_does_not_alias_or_mutate_other() -> None:
    a, b = HistogramObserver(64), HistogramObserver(64)
    a.update(np.float32([0.5, -0.25]))
    b.update(np.float32([100.0]))
    before = b.counts.copy(), b.k
    a.merge(b)
    assert np.array_equal(b.counts, before[0]) and b.k == before[1]
    fresh = HistogramObserver(64)
    fresh.merge(b)
    fresh.update(np.float32([1.0]))
    assert np.array_equal(b.counts, before[0])


def test_histogram_edge_values_exact() -> None:
    # values on bin edges, powers of two, -2^k itself, float64 subnormals and float16 input
    x = np.array([-4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.999], np.float32)
    obs = observe(x, 8)
    assert obs.k == 2  # [-4, 4)
    assert np.array_equal(obs.counts, [1, 0, 1, 2, 2, 1, 1, 1])
    tiny = np.array([-5e-324, 5e-324, -1e-310], np.float64)
    a, b = HistogramObserver(8), HistogramObserver(8)
    a.update(tiny)
    a.update(np.float64([1000.0]))  # raise k after the tiny values
    b.update(np.concatenate([tiny, [1000.0]]))
    assert_same_state(a, b)
    assert a.counts[3] == 2 and a.counts[4] == 1 and a.counts[7] == 1
    h = HistogramObserver(16)
    h.update(np.float16([1.5, -3.0]))
    assert (h.min_val, h.max_val, h.numel) == (-3.0, 1.5, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cls", [MinMaxObserver, HistogramObserver])
def test_non_finite_rejected(cls: type, bad: float) -> None:
    obs = cls()
    obs.update(np.float32([1.0, 2.0]))
    with pytest.raises(CalibrationError, match="non-finite"):
        obs.update(np.float32([0.0, bad, 3.0]))
    assert obs.numel == 2 and obs.max_val == 2.0  # state untouched


def test_state_is_constant_size() -> None:
    obs, mm = HistogramObserver(), MinMaxObserver()
    obs.update(np.zeros(3, np.float32))
    size = obs.state_nbytes(), mm.state_nbytes()
    for i in range(50):
        batch = RNG.standard_normal(1000).astype(np.float32) * (i + 1)
        obs.update(batch)
        mm.update(batch)
    assert (obs.state_nbytes(), mm.state_nbytes()) == size
    assert obs.state_nbytes() < 2048 * 8 + 64


# ------------------------------------------------------------------------------ policies


def within_one_bin(estimate: float, data: np.ndarray, p: float, w: float) -> bool:
    """|estimate - np.percentile| <= w, or, where the tail is sparser than a bin, within w of the
    interval [x_(j), x_(j+1)] of the order statistics numpy interpolates between."""
    s = np.sort(data.astype(np.float64))
    pos = p / 100 * (s.size - 1)
    a, b = s[int(math.floor(pos))], s[int(math.ceil(pos))]
    return abs(estimate - np.percentile(s, p)) <= w or a - w <= estimate <= b + w


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_vs_numpy(name: str, p: float) -> None:
    x = DISTRIBUTIONS[name]
    obs = observe(x, parts=3)
    w = obs.bin_width
    r = percentile_range(obs, p)  # t = P_p(|x|): 100 - p percent beyond it, both tails together
    assert within_one_bin(r.hi if r.hi >= -r.lo else -r.lo, np.abs(x), p, w)
    t = max(r.hi, -r.lo)
    assert r.lo == (0.0 if x.min() >= 0 else max(float(x.min()), -t))
    assert r.hi == (0.0 if x.max() <= 0 else min(float(x.max()), t))
    if p <= 99.9:  # dense enough here: plainly within one bin of numpy's value
        assert abs(t - np.percentile(np.abs(x.astype(np.float64)), p)) <= w
    rs = percentile_range(obs, p, symmetric=True)
    assert rs.lo == -rs.hi and within_one_bin(rs.hi, np.abs(x), p, w)
    assert percentile_range(obs, 100.0) == minmax_range(obs)


def brute_force_entropy_threshold(x: np.ndarray, obs: HistogramObserver, nq: int) -> float:
    """TensorRT's KL search written out with plain loops, on |x| binned independently."""
    w = obs.bin_width
    half = obs.num_bins // 2
    idx = np.floor(np.abs(x.astype(np.float64)) / w).astype(int)
    x64 = x.astype(np.float64)
    idx[(x64 < 0) & (np.abs(x64) % w == 0)] -= 1  # a negative value on an edge sits in the bin below, mirrored
    hist = np.bincount(np.minimum(idx, half - 1), minlength=half).astype(float)
    hist[0] -= np.count_nonzero(x == 0)  # exact zeros are exact on any grid: left out
    hist = hist.tolist()
    n = max(i for i, c in enumerate(hist) if c) + 1
    amax = float(np.abs(x).max())
    if n <= nq:
        return amax

    def smooth(d: list[float]) -> list[float] | None:
        zeros = sum(1 for v in d if v == 0)
        if zeros == len(d):
            return None
        eps1 = 1e-4 * zeros / (len(d) - zeros)
        return [max(v + 1e-4 if v == 0 else v - eps1, 1e-12) for v in d]

    best_i, best = -1, math.inf
    for i in range(nq, n + 1):
        p = hist[:i]
        p[-1] += sum(hist[i:])
        m = i // nq
        q = [0.0] * i
        for g in range(nq):
            start, stop = g * m, (g + 1) * m if g < nq - 1 else i
            total = sum(hist[start:stop])
            nnz = sum(1 for b in range(start, stop) if p[b] != 0)
            for b in range(start, stop):
                if p[b] != 0:
                    q[b] = total / nnz
        ps, qs = smooth(p), smooth(q)
        if ps is None or qs is None:
            continue
        sp, sq = sum(ps), sum(qs)
        kl = sum((a / sp) * math.log((a / sp) / (b / sq)) for a, b in zip(ps, qs, strict=True))
        if kl < best:  # first minimum
            best, best_i = kl, i
    return min(best_i * w, amax)


@pytest.mark.parametrize("name", ["normal", "laplace", "relu"])
def test_entropy_vs_brute_force(name: str) -> None:
    x = DISTRIBUTIONS[name][:50_000]
    obs = observe(x, 512)
    t = brute_force_entropy_threshold(x, obs, 32)
    assert entropy_range(obs, 32, symmetric=True) == Range(-t, t)
    # an asymmetric grid gives the dominant side 2*amax/(max-min) times the levels (2x one-signed)
    amax, span = float(np.abs(x).max()), float(x.max()) - float(x.min())
    nq = int(round(32 * min(2.0, max(1.0, 2 * amax / span))))
    assert nq == 64 or x.min() < 0
    t_asym = brute_force_entropy_threshold(x, obs, nq)
    r = entropy_range(obs, 32)
    assert r.hi == pytest.approx(min(float(x.max()), t_asym), abs=1e-12)
    expected_lo = 0.0 if x.min() >= 0 else max(float(x.min()), -t_asym)
    assert r.lo == pytest.approx(expected_lo, abs=1e-12)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_vs_brute_force(name: str, symmetric: bool) -> None:
    x = DISTRIBUTIONS[name]
    obs = observe(x, parts=2)
    grid = shrink_candidates(obs, symmetric, 50)
    m = float(np.abs(x).max())
    expect = [
        (-f * m, f * m) if symmetric else (f * float(x.min()), f * float(x.max())) for f in np.arange(50, 0, -1) / 50
    ]
    np.testing.assert_allclose([(c.lo, c.hi) for c in grid], expect, rtol=1e-12)
    truth = [true_mse(x, c) for c in grid]
    chosen = mse_range(obs, qdq_int8, symmetric, steps=50)
    assert chosen in grid
    assert true_mse(x, chosen) <= min(truth) * 1.02
    # the histogram's error estimate tracks the true error
    assert expected_error(obs, qdq_int8, chosen) == pytest.approx(true_mse(x, chosen), rel=0.1)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("symmetric", [False, True])
def test_hist_error_vs_brute_force(name: str, symmetric: bool) -> None:
    x = DISTRIBUTIONS[name]
    obs = observe(x, 1024)
    grid = trim_candidates(obs, symmetric)
    assert grid[0] == minmax_range(obs, symmetric) and len(grid) > 10
    for a, b in zip(grid, grid[1:]):  # each candidate lies inside the previous one
        assert b.lo >= a.lo and b.hi <= a.hi and (b.lo, b.hi) != (a.lo, a.hi)
    truth = [true_mse(x, c) for c in grid]
    chosen = hist_error_range(obs, qdq_int8, symmetric)
    assert chosen in grid
    assert true_mse(x, chosen) <= min(truth) * 1.02


def test_hist_error_trims_the_sparse_tail_only() -> None:
    # ReLU-like data: a dense spike at 0 and a long sparse right tail, so the left edge must stay
    x = np.concatenate([np.zeros(50_000), RNG.exponential(1.0, 50_000)]).astype(np.float32)
    grid = trim_candidates(observe(x))
    assert all(c.lo == 0.0 for c in grid) and grid[-1].hi < grid[0].hi / 2


def test_heavy_tailed_policies_clip_and_help() -> None:
    rng = np.random.default_rng(3)
    x = rng.laplace(size=1_000_000).astype(np.float32)
    x[:4] = [16.0, -16.0, 15.0, -15.0]  # a few outliers
    obs = observe(x, parts=4)
    base = minmax_range(obs)
    base_err = true_mse(x, base)
    for policy in ("percentile", "entropy", "mse", "histogram"):
        for symmetric in (False, True):
            r = compute_range(policy, obs, qdq_int8, symmetric)
            assert r.hi - r.lo < 0.75 * (base.hi - base.lo), (policy, symmetric, r)
            assert true_mse(x, r) < 0.8 * base_err, (policy, symmetric, r)


def test_one_signed_and_degenerate_data() -> None:
    pos = observe(np.float32([0.5, 1.0, 2.0, 2.0, 3.0]))
    assert entropy_range(pos).lo == 0.0  # non-negative data: lo = 0
    neg = observe(-DISTRIBUTIONS["relu"])
    assert entropy_range(neg).hi == 0.0
    const = observe(np.full(100, 2.5, np.float32))
    for policy in OBSERVER_POLICIES:
        r = compute_range(policy, const, qdq_int8, False)
        assert r.hi == 2.5 and r.lo in (0.0, 2.5), (policy, r)
    zeros = observe(np.zeros(10, np.float32))
    for policy in OBSERVER_POLICIES:
        for symmetric in (False, True):
            assert compute_range(policy, zeros, qdq_int8, symmetric) == Range(0.0, 0.0), policy


def test_make_observer_and_dispatch() -> None:
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    for policy in OBSERVER_POLICIES[1:]:
        obs = make_observer(policy, num_bins=256)
        assert isinstance(obs, HistogramObserver) and obs.num_bins == 256
    obs = make_observer("percentile", num_bins=1024, percentile=99.0)
    obs.update(DISTRIBUTIONS["normal"])
    opts = {"num_bins": 1024, "percentile": 99.0}
    assert compute_range("percentile", obs, None, False, **opts) == percentile_range(obs, 99.0)
    assert compute_range("entropy", obs, None, True, num_quant_bins=64) == entropy_range(obs, 64, True)
    assert compute_range("mse", obs, qdq_int8, False, steps=20) == mse_range(obs, qdq_int8, False, 20)
    assert compute_range("histogram", obs, qdq_int8, True) == hist_error_range(obs, qdq_int8, True)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_observer("kl"), "unknown calibration policy 'kl'; use one of minmax, percentile"),
        (lambda: make_observer("minmax", num_bins=10), "num_bins for calibration policy 'minmax'; valid: none"),
        (lambda: make_observer("entropy", percentile=99), "percentile.*valid: num_bins, num_quant_bins"),
        (lambda: make_observer("mse", num_bins=1000), "power of two"),
        (lambda: compute_range("mse", HistogramObserver(), None, False), "needs a qdq"),
        (lambda: compute_range("percentile", HistogramObserver(), None, False, percentile=10), "in \\[50, 100\\]"),
        (lambda: compute_range("entropy", MinMaxObserver(), None, False), "needs a HistogramObserver"),
        (lambda: compute_range("mse", HistogramObserver(), qdq_int8, False, stpes=3), "stpes.*valid: num_bins, steps"),
        (lambda: HistogramObserver(64).merge(HistogramObserver(128)), "merge a 128-bin histogram into a 64-bin one"),
    ],
)
def test_config_errors(call, match: str) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=match):
        call()


def test_empty_observer_errors() -> None:
    with pytest.raises(CalibrationError, match="seen no data"):
        compute_range("percentile", HistogramObserver(), None, False)
    with pytest.raises(CalibrationError, match="seen no data"):
        minmax_range(MinMaxObserver())


def test_entropy_policy_keeps_kl_range_only_when_it_lowers_error() -> None:
    rng = np.random.default_rng(11)
    sparse = np.concatenate([np.zeros(20_000), rng.uniform(0, 6, 200)]).astype(np.float32)  # few, spread-out values
    heavy = np.concatenate([rng.standard_normal(200_000), [300.0, -290.0]]).astype(np.float32)  # an outlier pair
    for x in (sparse, heavy):
        obs = HistogramObserver(2048)
        obs.update(x)
        kl = entropy_range(obs)
        full = minmax_range(obs)
        chosen = compute_range("entropy", obs, qdq_int8, False)
        best = min((kl, full), key=lambda r: expected_error(obs, qdq_int8, r))
        assert chosen == best
    assert compute_range("entropy", obs, qdq_int8, False) == kl != full  # the outliers: KL clips them


# ------------------------------------------------------------------------------ slow reference
# The implementation before the searches were vectorized, kept verbatim as the oracle: one qdq
# call per candidate, one KL divergence per threshold, Python loops over bins and candidates,
# the histogram binned in float64. The fast code must pick the same ranges, bit for bit.


def ref_update(obs: HistogramObserver, x: np.ndarray) -> None:
    """HistogramObserver.update as it was: every batch binned in float64."""
    x = np.asarray(x)
    if x.size == 0:
        return
    lo, hi = histogram_mod._extremes(x)
    obs._raise_to(max(histogram_mod._needed_k(lo, hi), histogram_mod._K_MIN if obs.k is None else obs.k))
    assert obs.k is not None
    y = np.multiply(x, math.ldexp(1.0, obs._log2 - obs.k - 1), dtype=np.float64)
    np.floor(y, out=y)
    if lo < 0 and x.dtype.kind == "f" and x.dtype.itemsize >= 8:
        y[(y == 0) & (x < 0)] = -1.0
    idx = y.astype(np.intp).ravel()
    idx += obs.num_bins // 2
    obs.counts += np.bincount(idx, minlength=obs.num_bins)
    obs.min_val, obs.max_val = min(obs.min_val, lo), max(obs.max_val, hi)
    obs.numel += int(x.size)
    if lo <= 0 <= hi:
        obs.zeros += int(np.count_nonzero(x == 0))


def ref_smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zero = p == 0
    n_zero = int(zero.sum())
    if n_zero == p.size:
        return None
    out = p + np.where(zero, eps, -eps * n_zero / (p.size - n_zero))
    return np.maximum(out, 1e-12)


def ref_kl(hist: np.ndarray, i: int, num_quant_bins: int, tail: float) -> float:
    sliced = np.asarray(hist[:i], dtype=np.float64)
    p = sliced.copy()
    p[-1] += tail
    nonzero = p != 0
    groups = np.minimum(np.arange(i) // (i // num_quant_bins), num_quant_bins - 1)
    sums = np.bincount(groups, weights=sliced, minlength=num_quant_bins)
    nnz = np.bincount(groups, weights=nonzero, minlength=num_quant_bins)
    q = np.where(nonzero, sums[groups] / np.maximum(nnz[groups], 1.0), 0.0)
    ps, qs = ref_smooth(p), ref_smooth(q)
    if ps is None or qs is None:
        return math.inf
    ps, qs = ps / ps.sum(), qs / qs.sum()
    return float(np.sum(ps * np.log(ps / qs)))


def ref_kl_all(obs: HistogramObserver, num_quant_bins: int, symmetric: bool) -> tuple[np.ndarray, int, int] | None:
    """(every candidate's divergence, nq, first candidate) of the KL search, or None if there is none."""
    nq = num_quant_bins if symmetric else kl_mod.asymmetric_quant_bins(obs, num_quant_bins)
    half = obs.num_bins // 2
    hist = (obs.counts[half:] + obs.counts[half - 1 :: -1]).copy()
    hist[0] -= obs.zeros
    occupied = np.flatnonzero(hist)
    if occupied.size == 0 or int(occupied[-1]) + 1 <= nq:
        return None
    n = int(occupied[-1]) + 1
    hist64 = hist.astype(np.float64)
    tails = np.concatenate([np.cumsum(hist64[::-1])[::-1], [0.0]])
    return np.array([ref_kl(hist64, i, nq, float(tails[i])) for i in range(nq, n + 1)]), nq, nq


def ref_threshold_range(obs: HistogramObserver, t: float, symmetric: bool) -> Range:
    if symmetric:
        return Range(-t, t)
    lo = 0.0 if obs.min_val >= 0 else max(obs.min_val, -t)
    hi = 0.0 if obs.max_val <= 0 else min(obs.max_val, t)
    return Range(lo, hi)


def ref_entropy_range(obs: HistogramObserver, num_quant_bins: int = 128, symmetric: bool = False) -> Range:
    amax = max(-obs.min_val, obs.max_val)
    found = ref_kl_all(obs, num_quant_bins, symmetric)
    if found is None:
        return ref_threshold_range(obs, amax, symmetric)
    divs, _, first = found
    t = min((first + int(np.argmin(divs))) * obs.bin_width, amax)
    return ref_threshold_range(obs, t, symmetric)


def ref_samples(obs: HistogramObserver) -> tuple[np.ndarray, np.ndarray]:
    occupied = np.flatnonzero(obs.counts)
    edges = obs.edges()
    lo = np.maximum(edges[occupied], obs.min_val)
    hi = np.minimum(edges[occupied + 1], obs.max_val)
    frac = (np.arange(4) + 0.5) / 4
    values = (lo[:, None] + (hi - lo)[:, None] * frac[None, :]).ravel()
    counts = obs.counts[occupied].astype(np.float64)
    counts[occupied == obs.num_bins // 2] -= obs.zeros
    weights = np.repeat(counts / 4, 4)
    if obs.zeros:
        values, weights = np.append(values, 0.0), np.append(weights, float(obs.zeros))
    return values, weights


def ref_error(values: np.ndarray, weights: np.ndarray, qdq, rng: Range) -> float:  # noqa: ANN001
    diff = np.asarray(qdq(values, rng.lo, rng.hi), np.float64) - values
    return float(np.dot(weights, diff * diff) / weights.sum())


def ref_best(obs: HistogramObserver, qdq, candidates: list[Range]) -> Range:  # noqa: ANN001
    values, weights = ref_samples(obs)
    errors = [ref_error(values, weights, qdq, c) for c in candidates]
    return candidates[int(np.argmin(errors))]


def ref_shrink_candidates(obs: HistogramObserver, symmetric: bool = False, steps: int = 100) -> list[Range]:
    factors = [j / steps for j in range(steps, 0, -1)]
    amax = max(-obs.min_val, obs.max_val)
    if symmetric:
        return [Range(-f * amax, f * amax) for f in factors]
    return [Range(f * obs.min_val, f * obs.max_val) for f in factors]


def ref_trim_candidates(obs: HistogramObserver, symmetric: bool = False) -> list[Range]:
    w = obs.bin_width
    if symmetric:
        amax = max(-obs.min_val, obs.max_val)
        half = obs.num_bins // 2
        occupied = np.flatnonzero(obs.counts[half:] + obs.counts[half - 1 :: -1])
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


def ref_compute_range(policy: str, obs: HistogramObserver, qdq, symmetric: bool, **options) -> Range:  # noqa: ANN001, ANN003
    if policy == "entropy":
        proposal = ref_entropy_range(obs, options.get("num_quant_bins", 128), symmetric)
        amax = max(-obs.min_val, obs.max_val)
        full = Range(-amax, amax) if symmetric else Range(obs.min_val, obs.max_val)
        values, weights = ref_samples(obs)
        better = ref_error(values, weights, qdq, proposal) < ref_error(values, weights, qdq, full)
        return proposal if better else full
    if policy == "mse":
        return ref_best(obs, qdq, ref_shrink_candidates(obs, symmetric, options.get("steps", 100)))
    assert policy == "histogram"
    return ref_best(obs, qdq, ref_trim_candidates(obs, symmetric))


def same_range(a: Range, b: Range) -> bool:
    """Equal bit for bit (0.0 and -0.0 differ)."""
    return np.float64(a.lo).tobytes() == np.float64(b.lo).tobytes() and (
        np.float64(a.hi).tobytes() == np.float64(b.hi).tobytes()
    )


def same_grid(a: list[Range], b: list[Range]) -> bool:
    return len(a) == len(b) and all(same_range(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ fast == slow


def oracle_cases() -> list[tuple[str, np.ndarray, int]]:
    """(name, data, num_bins): dense, heavy-tailed, one-signed, sparse, tied and tiny data."""
    rng = np.random.default_rng(2024)
    tied = np.repeat(np.float32([-3.0, -1.0, 1.0, 3.0, 0.5, -0.5]), [5, 40, 40, 5, 9, 9])  # mirror-image tails
    cases = [(f"{name}/{bins}", x[:60_000], bins) for name, x in DISTRIBUTIONS.items() for bins in (2048, 256)]
    cases += [
        ("cauchy", rng.standard_cauchy(30_000).astype(np.float32), 2048),
        ("sparse-relu", np.concatenate([np.zeros(20_000), rng.uniform(0, 6, 200)]).astype(np.float32), 2048),
        ("few-values", rng.choice(np.float32([-2.5, 0.0, 0.3, 1.7, 4.0]), 5000), 512),
        ("tied-tails", tied, 64),
        ("outliers", np.concatenate([rng.standard_normal(50_000), [300.0, -290.0]]).astype(np.float32), 2048),
        ("negative", -np.abs(rng.laplace(size=20_000)).astype(np.float32), 1024),
        ("constant", np.full(100, 2.5, np.float32), 2048),
        ("zeros", np.zeros(10, np.float32), 2048),
        ("tiny", (rng.standard_normal(5000) * 1e-30).astype(np.float32), 2048),
        ("float64", rng.standard_normal(20_000) * 3, 2048),
    ]
    return cases


CASES = oracle_cases()


def qdq_formats() -> dict[str, object]:
    from onnxcomp.quant.qparams import range_qdq

    out: dict[str, object] = {"scalar-only int8": qdq_int8}
    for dtype in ("int8", "uint8", "int4", "fp8_e4m3", "hif8"):
        for symmetric in (False, True):
            out[f"{dtype}/{'sym' if symmetric else 'asym'}"] = range_qdq(dtype, symmetric)
    return out


QDQS = qdq_formats()


@pytest.mark.parametrize(("name", "x", "bins"), CASES, ids=[c[0] for c in CASES])
def test_update_same_state_as_float64_binning(name: str, x: np.ndarray, bins: int) -> None:
    fast, slow = HistogramObserver(bins), HistogramObserver(bins)
    for chunk in np.array_split(x, 3):
        fast.update(chunk)
        ref_update(slow, chunk)
    assert_same_state(fast, slow)


@pytest.mark.parametrize("num_bins", [8, 2048, 2**24])
def test_update_float32_edge_cases(num_bins: int) -> None:
    rng = np.random.default_rng(5)
    tiny = np.float32([-1e-45, 1e-45, -1.2e-38, 1.2e-38, -3e-39, 0.0, -0.0])  # subnormals, signed zeros
    batches = [
        tiny,  # alone: 2^m is not a float32 (m > 127): the float64 path
        np.concatenate([tiny, np.float32([1000.0, -7.0])]),  # m < 0: subnormal products underflow to -0.0
        np.float32([-(2.0**20), 2.0**20 - 1, -(2.0**-20)]),  # -2^k itself, edges
        rng.standard_normal(200_003).astype(np.float32) * 50,  # several chunks, a ragged last one
        (rng.standard_normal(70_000) * 1e-3).astype(np.float32),
        np.float16([1.5, -3.0, 0.0]),
        np.int32([-5, 0, 9]),
    ]
    fast, slow = HistogramObserver(num_bins), HistogramObserver(num_bins)
    for batch in batches:
        fast.update(batch)
        ref_update(slow, batch)
        assert_same_state(fast, slow)
    for values in (tiny, -tiny, np.float32([-1e-45] * 5 + [3e38])):
        a, b = HistogramObserver(num_bins), HistogramObserver(num_bins)
        a.update(values)
        ref_update(b, values)
        assert_same_state(a, b)


@pytest.mark.parametrize(("name", "x", "bins"), CASES, ids=[c[0] for c in CASES])
def test_candidate_grids_equal_reference(name: str, x: np.ndarray, bins: int) -> None:
    obs = observe(x, bins)
    for symmetric in (False, True):
        assert same_grid(trim_candidates(obs, symmetric), ref_trim_candidates(obs, symmetric))
        for steps in (1, 7, 100):
            assert same_grid(shrink_candidates(obs, symmetric, steps), ref_shrink_candidates(obs, symmetric, steps))


def test_trim_grid_on_random_histograms() -> None:
    """The merge form of the trimming loop, on many small histograms full of count ties."""
    rng = np.random.default_rng(9)
    for trial in range(400):
        obs = HistogramObserver(int(rng.choice([8, 16, 64])))
        obs.update(rng.integers(-8, 8, int(rng.integers(1, 60))).astype(np.float32) * float(rng.choice([0.5, 1, 3])))
        for symmetric in (False, True):
            assert same_grid(trim_candidates(obs, symmetric), ref_trim_candidates(obs, symmetric)), trial


@pytest.mark.parametrize(("name", "x", "bins"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("symmetric", [False, True])
def test_entropy_threshold_equals_reference(name: str, x: np.ndarray, bins: int, symmetric: bool) -> None:
    obs = observe(x, bins)
    for nq in (128, 32, 7, 2):
        assert same_range(entropy_range(obs, nq, symmetric), ref_entropy_range(obs, nq, symmetric)), nq


def test_kl_estimates_within_their_bounds() -> None:
    """Every candidate's fast divergence lies within its bound of the exact one (the property
    that makes the exact recheck of the few close candidates return the reference's index)."""
    rng = np.random.default_rng(17)
    worst = 0.0
    hists = [observe(x, bins) for _, x, bins in CASES]
    for _ in range(40):  # random sparse-to-dense histograms
        obs = HistogramObserver(int(rng.choice([64, 256, 2048])))
        obs.update((rng.standard_cauchy(int(rng.integers(20, 20_000))) * rng.uniform(0.1, 10)).astype(np.float32))
        hists.append(obs)
    for obs in hists:
        for nq in (128, 16, 3):
            found = ref_kl_all(obs, nq, symmetric=True)
            if found is None:
                continue
            divs, nq, first = found
            half = obs.num_bins // 2
            hist = (obs.counts[half:] + obs.counts[half - 1 :: -1]).astype(np.float64)
            hist[0] -= obs.zeros
            n = first + divs.size - 1
            tails = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
            approx, bound = kl_mod._kl_estimates(hist[:n], tails, np.arange(first, n + 1), nq)
            finite = np.isfinite(divs)
            assert np.array_equal(~finite, np.isinf(approx) & (bound == 0))
            ok = finite & np.isfinite(bound)
            assert np.all(np.abs(approx[ok] - divs[ok]) <= bound[ok])
            worst = max(worst, float(np.max(np.abs(approx[ok] - divs[ok]) / bound[ok], initial=0.0)))
            assert kl_mod._kl_argmin(hist, nq, n) == int(np.argmin(divs))
    assert worst < 0.01  # the bound has ample room


def test_first_min_rechecks_every_possible_minimum() -> None:
    """The selection behind the KL search: estimates within their bounds, ties (the first wins),
    infinities and unestimated candidates; only the close candidates are computed exactly."""
    rng = np.random.default_rng(23)
    for trial in range(300):
        exact = rng.integers(0, 6, int(rng.integers(1, 40))).astype(np.float64) * 1e-3  # many exact ties
        exact[rng.random(exact.size) < 0.1] = math.inf
        bound = rng.choice([0.0, 1e-4, 2e-3], exact.size)
        approx = exact + rng.uniform(-1, 1, exact.size) * bound
        approx[np.isinf(exact)], bound[np.isinf(exact)] = math.inf, 0.0
        unknown = rng.random(exact.size) < 0.05
        approx[unknown], bound[unknown] = 0.0, math.inf
        asked: list[int] = []

        def value(c: int, exact: np.ndarray = exact, asked: list[int] = asked) -> float:
            asked.append(c)
            return float(exact[c])

        assert kl_mod._first_min(approx, bound, value) == int(np.argmin(exact)), trial
        if np.isfinite(np.min(approx + bound)) and not unknown.any() and (bound == 0).all():
            assert len(asked) == int(np.sum(exact == exact.min()))  # exact estimates: the minima only


@pytest.mark.parametrize(("name", "x", "bins"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("qdq_name", list(QDQS))
def test_error_searches_equal_reference(name: str, x: np.ndarray, bins: int, qdq_name: str) -> None:
    qdq = QDQS[qdq_name]
    obs = observe(x, bins, parts=2)
    for symmetric in (False, True):
        for policy, options in (("mse", {}), ("mse", {"steps": 13}), ("histogram", {}), ("entropy", {})):
            fast = compute_range(policy, obs, qdq, symmetric, **options)
            slow = ref_compute_range(policy, obs, qdq, symmetric, **options)
            assert same_range(fast, slow), (policy, symmetric, fast, slow)
        # and every candidate's error, bit for bit
        values, weights = ref_samples(obs)
        grid = ref_trim_candidates(obs, symmetric)
        lo, hi = np.array([c.lo for c in grid]), np.array([c.hi for c in grid])
        errors = error_mod._errors(values, weights, qdq, lo, hi)
        expected = np.array([ref_error(values, weights, qdq, c) for c in grid])
        assert errors.tobytes() == expected.tobytes()


def test_block_qdq_calls_and_fallbacks() -> None:
    from onnxcomp.quant.qparams import range_qdq

    obs = observe(DISTRIBUTIONS["laplace"][:50_000])
    inner = range_qdq("uint8", False)
    calls = {"scalar": 0, "block": 0}

    def counting(values: np.ndarray, lo, hi) -> np.ndarray:  # noqa: ANN001
        calls["block" if np.ndim(lo) else "scalar"] += 1
        return inner(values, lo, hi)

    expected = ref_compute_range("histogram", obs, inner, False)
    assert same_range(hist_error_range(obs, counting, False), expected)
    assert calls["scalar"] == 2 and calls["block"] >= 1  # first and last candidate checked one by one

    def lying(values: np.ndarray, lo, hi) -> np.ndarray:  # noqa: ANN001
        out = inner(values, lo, hi)
        return out if np.ndim(lo) == 0 else out * 0.5  # a block answer unlike the scalar one

    def reduced(values: np.ndarray, lo, hi) -> np.ndarray:  # noqa: ANN001
        return inner(values, np.min(lo), np.max(hi))  # takes arrays but collapses them: one row

    for qdq in (lying, reduced, qdq_int8):
        assert same_range(hist_error_range(obs, qdq, False), ref_compute_range("histogram", obs, qdq, False))
        assert same_range(mse_range(obs, qdq, True, 5), ref_compute_range("mse", obs, qdq, True, steps=5))
    one = observe(np.float32([1.0, 2.0]), 8)
    assert same_range(mse_range(one, inner, False, 1), ref_compute_range("mse", one, inner, False, steps=1))


def test_error_search_memory_is_bounded() -> None:
    """The block evaluation never holds all candidates x samples at once."""
    import tracemalloc

    from onnxcomp.quant.qparams import range_qdq

    obs = observe(DISTRIBUTIONS["laplace"], 8192)
    qdq = range_qdq("int8", True)
    values, _ = ref_samples(obs)
    grid = trim_candidates(obs, True)
    tracemalloc.start()
    try:
        hist_error_range(obs, qdq, True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(grid) * values.size * 8 > 20 * peak  # far below one float64 per candidate x sample


def test_integer_grid_path_is_used_and_guarded() -> None:
    """Integer formats' errors come from their grids (``RangeQDQ.integer_grid``: no block qdq
    calls, the same floats as the reference); a grid that disagrees with the scalar calls is
    caught by the first/last-row check and the block path answers instead."""
    from onnxcomp.quant.qparams import RangeQDQ

    obs = observe(DISTRIBUTIONS["laplace"][:50_000])
    values, weights = ref_samples(obs)

    class Counting(RangeQDQ):
        def __init__(self, dtype: str, symmetric: bool, scale_by: float = 1.0) -> None:
            super().__init__(dtype, symmetric)
            self.calls = {"scalar": 0, "block": 0}
            self.scale_by = scale_by

        def __call__(self, values: np.ndarray, lo, hi) -> np.ndarray:  # noqa: ANN001
            self.calls["block" if np.ndim(lo) else "scalar"] += 1
            return super().__call__(values, lo, hi)

        def integer_grid(self, lo: np.ndarray, hi: np.ndarray):  # noqa: ANN201
            grid = super().integer_grid(lo, hi)
            assert grid is not None
            return (grid[0] * np.float32(self.scale_by), *grid[1:])

    for dtype, symmetric in (("uint8", False), ("int8", True), ("int4", False), ("int16", True)):
        grid = ref_trim_candidates(obs, symmetric)
        lo, hi = np.array([c.lo for c in grid]), np.array([c.hi for c in grid])
        honest = Counting(dtype, symmetric)
        expected = np.array([ref_error(values, weights, honest, c) for c in grid])
        honest.calls = {"scalar": 0, "block": 0}
        assert error_mod._errors(values, weights, honest, lo, hi).tobytes() == expected.tobytes()
        assert honest.calls == {"scalar": 2, "block": 0}  # first and last checked, the rest from grids
        lying = Counting(dtype, symmetric, scale_by=1.5)
        assert error_mod._errors(values, weights, lying, lo, hi).tobytes() == expected.tobytes()
        assert lying.calls["block"] >= 1  # the grid was refused: the block path answered
    assert RangeQDQ("fp8_e4m3", False).integer_grid(np.zeros(2), np.ones(2)) is None
