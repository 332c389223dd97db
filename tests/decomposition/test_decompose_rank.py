"""Rank rules, EVBMF, alignment, deterministic SVD and the streamed normal equations."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.decomposition.factor import conv_factors, conv_matrix, svd
from onnxcomp.decomposition.rank import (
    Band,
    align_rank,
    choose_rank,
    energy_rank,
    evbmf_rank,
    minimize_bounded,
    parse_rank_rule,
)
from onnxcomp.decomposition.refit import NormalEquations
from onnxcomp.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("auto", "auto", 0.0),
        ("energy:0.9", "energy", 0.9),
        ("ratio:0.5", "ratio", 0.5),
        ("rank:32", "rank", 32),
        ("RANK:7", "rank", 7),
    ],
)
def test_parse_rank_rule(text: str, kind: str, value: float) -> None:
    rule = parse_rank_rule(text)
    assert (rule.kind, rule.value) == (kind, value)
    assert parse_rank_rule(str(rule)) == rule


@pytest.mark.parametrize(
    "text", ["", "auto:1", "energy", "energy:0", "energy:1.5", "ratio:x", "rank:0", "rank:2.5", "svd"]
)
def test_parse_rank_rule_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="rank rule"):
        parse_rank_rule(text)


@pytest.mark.parametrize(
    ("rank", "align", "cap", "expected"),
    [
        (27, 16, 192, 32),
        (32, 16, 192, 32),
        (8, 16, 48, 16),
        (40, 16, 999, 48),
        (23, 16, 999, 32),
        (17, 16, 999, 16),
        (20, 16, 999, 32),
        (5, 1, 3, 3),
        (0, 1, 10, 1),
        (200, 16, 96, 96),
    ],
)
def test_align_rank_is_amct_make_divisible(rank: int, align: int, cap: int, expected: int) -> None:
    # AMCT: max(16, (r + 8) // 16 * 16), + 16 when below 0.9 r (23 -> 16 < 20.7 -> 32), capped
    assert align_rank(rank, align, cap) == expected


def test_energy_rounds_up_to_keep_the_energy() -> None:
    s = np.ones(64)
    choice = choose_rank(s, (64, 64), parse_rank_rule("energy:0.5"), 1, 64, 16, Band())
    assert choice.detail["raw_rank"] == 32 and choice.rank == 32
    choice = choose_rank(s, (64, 64), parse_rank_rule("energy:0.52"), 1, 64, 16, Band())
    assert choice.detail["raw_rank"] == 34 and choice.rank == 48 and choice.detail["energy_kept"] >= 0.52
    assert align_rank(34, 16, 999) == 32 and align_rank(34, 16, 999, up=True) == 48  # 32/64 < 0.52


def test_energy_rank() -> None:
    s = np.sqrt(np.array([50.0, 30.0, 15.0, 5.0]))
    assert [energy_rank(s, e) for e in (0.5, 0.8, 0.9, 0.95, 1.0)] == [1, 2, 3, 3, 4]


@pytest.mark.parametrize(("shape", "rank", "noise"), [((192, 192), 20, 0.1), ((100, 300), 10, 1.0), ((48, 96), 8, 0.2)])
def test_evbmf_recovers_a_planted_rank_at_any_scale(shape: tuple[int, int], rank: int, noise: float) -> None:
    r = np.random.default_rng(0)
    y = r.standard_normal((shape[0], rank)) @ r.standard_normal((rank, shape[1])) + noise * r.standard_normal(shape)
    s = np.linalg.svd(y, compute_uv=False)
    found, sigma2, threshold = evbmf_rank(s, shape)
    assert found == rank and sigma2 == pytest.approx(noise**2, rel=0.1) and s[rank - 1] > threshold > s[rank]
    assert evbmf_rank(s * 1e-4, shape)[0] == evbmf_rank(s * 1e4, shape)[0] == rank


def test_evbmf_of_zero_singular_values() -> None:
    assert evbmf_rank(np.zeros(5), (5, 7)) == (0, 0.0, 0.0)
    assert evbmf_rank(np.array([3.0, 0.0, 0.0]), (3, 9))[0] <= 1


def test_minimize_bounded() -> None:
    assert minimize_bounded(lambda x: (x - 0.3) ** 2, 0.0, 1.0) == pytest.approx(0.3, abs=1e-5)
    assert minimize_bounded(lambda x: x, 0.2, 1.0) == pytest.approx(0.2, abs=1e-4)  # minimum on the bound


def test_choose_rank_rules_and_band() -> None:
    s = np.linspace(10, 1, 192)
    band = Band()
    assert choose_rank(s, (192, 192), parse_rank_rule("ratio:0.5"), 3, 64, 16, band).rank == 32
    assert choose_rank(s, (192, 192), parse_rank_rule("rank:40"), 3, 64, 1, band).rank == 40
    auto = choose_rank(s, (192, 192), parse_rank_rule("auto"), 3, 64, 16, band)
    assert auto.detail["band"] == [27, 32] and auto.rank == 32 and auto.rule == "auto"
    assert choose_rank(s, (192, 192), parse_rank_rule("auto"), 3, 64, 1, Band(divisor=0)).detail.get("band") is None
    energy = choose_rank(s, (192, 192), parse_rank_rule("energy:0.5"), 3, 64, 1, band)
    assert energy.detail["energy_kept"] >= 0.5 and energy.rank == energy_rank(s, 0.5)


def test_svd_signs_are_fixed_and_factors_rebuild_the_conv() -> None:
    w = np.random.default_rng(3).standard_normal((6, 4, 3, 5))
    m = conv_matrix(w)
    assert m.shape == (12, 30) and m[2 * 3 + 1, 5 * 5 + 4] == w[5, 2, 1, 4]
    a, b = svd(m), svd(m.copy())
    assert np.array_equal(a.u, b.u) and np.array_equal(a.vt, b.vt)
    pivots = np.abs(a.u).argmax(axis=0)
    assert (a.u[pivots, np.arange(a.u.shape[1])] > 0).all()
    flipped = svd(-m)  # same matrix up to sign: the fixed-sign left vectors agree
    assert np.allclose(np.abs(flipped.u), np.abs(a.u))
    f, g = a.factors(12)
    w1, w2 = conv_factors(f, g, w.shape)
    assert w1.shape == (12, 4, 3, 1) and w2.shape == (6, 12, 1, 5)
    np.testing.assert_allclose(np.einsum("kci,okj->ocij", w1[..., 0], w2[:, :, 0, :]), w, atol=1e-12)


def test_single_threaded_blas_restores_the_thread_count() -> None:
    from onnxcomp.blas import _openblas_threads, single_threaded_blas

    threads = _openblas_threads()
    if threads is None:
        pytest.skip("numpy does not use its bundled OpenBLAS here")
    get, _ = threads
    before = get()
    with single_threaded_blas():
        assert get() == 1
    assert get() == before


def test_streamed_normal_equations_match_a_direct_solve() -> None:
    r = np.random.default_rng(1)
    a, y = r.standard_normal((5000, 7)), r.standard_normal((5000, 3))
    eq = NormalEquations(7, 3, intercept=True)
    for chunk in np.array_split(np.arange(5000), 9):
        eq.add(a[chunk], y[chunk])
    design = np.concatenate([a, np.ones((5000, 1))], axis=1)
    direct = np.linalg.lstsq(design, y, rcond=None)[0]
    solved = eq.solve(np.zeros((8, 3)), damping=0.0)
    np.testing.assert_allclose(solved, direct, atol=1e-10)
    residual = np.sum((design @ solved - y) ** 2) / np.sum(y**2)
    assert eq.residual(solved) == pytest.approx(residual, rel=1e-9)
    assert eq.gram.shape == (8, 8) and eq.rows == 5000  # state independent of the number of rows
