"""n:m masks against a brute-force reference (padding, short axes, ties), keep counts, weight stats."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxcomp.analysis.sparsity import weight_sparsity
from onnxcomp.errors import ConfigError
from onnxcomp.formats.nm import (
    NMPattern,
    apply_nm,
    is_nm_sparse,
    nm_fraction,
    nm_mask,
    parse_pattern,
)
from onnxcomp.ir import reduction_axis
from onnxcomp.sparsity.masks import keep_count


def brute_force_mask(w: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Every group of m along ``axis`` (zero-padded): the n-subset of largest total |w|."""
    moved = np.moveaxis(w, axis, -1)
    length = moved.shape[-1]
    mask = np.ones(moved.shape, dtype=bool)
    if length <= n:
        return np.moveaxis(mask, -1, axis)
    for idx in np.ndindex(moved.shape[:-1]):
        row = moved[idx]
        for start in range(0, length, m):
            group = np.zeros(m)
            real = row[start : start + m]
            group[: len(real)] = np.abs(real)
            best = max(itertools.combinations(range(m), n), key=lambda s: (group[list(s)].sum(), [-i for i in s]))
            for j in range(len(real)):
                mask[idx + (start + j,)] = j in best
    return np.moveaxis(mask, -1, axis)


CASES = {
    "conv_cin8": ((5, 8, 3, 3), 1),
    "conv_cin11_padded": ((4, 11, 3, 3), 1),
    "conv_cin3_padded": ((4, 3, 1, 1), 1),
    "conv_cin5_1x1": ((6, 5, 1, 1), 1),
    "gemm_k10_axis0": ((10, 7), 0),
    "gemm_transb_k13": ((6, 13), 1),
    "matmul_3d": ((2, 9, 4), 1),
}


@pytest.mark.parametrize(("shape", "axis"), list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)], ids=["2:4", "1:4", "4:8", "1:2"])
def test_mask_matches_brute_force(shape: tuple[int, ...], axis: int, n: int, m: int) -> None:
    w = np.random.default_rng(sum(shape) + n * m).standard_normal(shape).astype(np.float32)
    mask = nm_mask(w, axis, NMPattern(n, m))
    np.testing.assert_array_equal(mask, brute_force_mask(w, axis, n, m))
    sparse = apply_nm(w, axis, NMPattern(n, m))
    assert sparse.shape == w.shape and sparse.dtype == w.dtype
    np.testing.assert_array_equal(sparse, np.where(mask, w, 0))
    assert nm_fraction(sparse, axis, NMPattern(n, m)) == 1.0


@pytest.mark.parametrize("length", [1, 2])
def test_short_axis_is_left_alone(length: int) -> None:
    w = np.random.default_rng(0).standard_normal((3, length, 3, 3)).astype(np.float32)
    assert nm_mask(w, 1, NMPattern()).all()
    np.testing.assert_array_equal(apply_nm(w, 1, NMPattern()), w)
    assert not is_nm_sparse(w, 1)


def test_padded_tail_keeps_two_of_three() -> None:
    w = np.array([[1.0, -5.0, 2.0, 0.5, 3.0, -0.1, 4.0]], dtype=np.float32)  # groups [1,-5,2,.5] [3,-.1,4,pad]
    np.testing.assert_array_equal(apply_nm(w, 1, NMPattern()), [[0, -5, 2, 0, 3, 0, 4]])


def test_ties_keep_the_lower_index() -> None:
    w = np.ones((2, 8), dtype=np.float32)
    np.testing.assert_array_equal(nm_mask(w, 1, NMPattern())[0], [1, 1, 0, 0, 1, 1, 0, 0])


def test_pattern_checks() -> None:
    w = apply_nm(np.random.default_rng(1).standard_normal((4, 16)), 1, NMPattern())
    assert is_nm_sparse(w, 1) and nm_fraction(w, 1, NMPattern()) == 1.0
    dense = np.ones((4, 16))
    assert nm_fraction(dense, 1, NMPattern()) == 0.0 and not is_nm_sparse(dense, 1)
    info = weight_sparsity(w)
    assert info == {"zero_fraction": 0.5, "pattern": "2:4", "pattern_fraction": 1.0, "axis": 1}
    assert weight_sparsity(dense)["pattern"] is None
    assert weight_sparsity(w.T.copy())["axis"] == 0  # a (K, N) weight: the pattern holds along axis 0


def test_parse_pattern() -> None:
    assert parse_pattern("2:4") == NMPattern(2, 4) and str(parse_pattern(" 4:8 ")) == "4:8"
    for bad in ("4:2", "2", "a:b", "0:4", "2:2"):
        with pytest.raises(ConfigError, match="n:m"):
            parse_pattern(bad)


def test_reduction_axes() -> None:
    assert reduction_axis("Conv", 4) == 1
    assert reduction_axis("Gemm", 2) == 0 and reduction_axis("Gemm", 2, trans_b=True) == 1
    assert reduction_axis("MatMul", 2) == 0 and reduction_axis("MatMul", 3) == 1


@pytest.mark.parametrize(
    ("channels", "ratio", "round_to", "expected"),
    [
        (20, 0.25, 1, 15),
        (20, 0.25, 16, 16),
        (16, 0.25, 16, 16),
        (64, 0.3, 16, 48),
        (64, 0.3, 1, 45),
        (4, 0.9, 1, 1),
        (10, 0.0, 1, 10),
        (7, 0.5, 4, 4),
    ],
)
def test_keep_count(channels: int, ratio: float, round_to: int, expected: int) -> None:
    assert keep_count(channels, ratio, round_to) == expected


@pytest.mark.parametrize("layout", ["float32", "uint8 codes", "transposed view"])
def test_nm_fraction_brute_force(layout: str) -> None:
    """nm_fraction against a loop over the zero-padded groups: -0.0 is zero, NaN / inf are not;
    one-byte codes (what quant records count on) and non-contiguous views count the same."""
    rng = np.random.default_rng(3)
    for shape in [(6, 10), (3, 4, 5), (7,), (2, 9, 3, 3), (5, 16), (4, 8, 12)]:
        w = rng.standard_normal(shape).astype(np.float32)
        w.reshape(-1)[rng.random(w.size) < 0.5] = 0.0
        w.reshape(-1)[:3] = [-0.0, np.nan, -np.inf]
        if layout == "uint8 codes":
            w = np.where(np.isnan(w) | (w != 0), 9, 0).astype(np.uint8)
        elif layout == "transposed view":
            w = w.T
        for axis in range(w.ndim):
            for n, m in ((2, 4), (1, 4), (1, 3), (4, 8)):
                moved = np.moveaxis(w, axis, -1).reshape(-1, w.shape[axis])
                good = total = 0
                for row in moved:
                    for start in range(0, len(row), m):
                        total += 1
                        good += int(sum(1 for v in row[start : start + m] if v != 0) <= n)
                assert nm_fraction(w, axis, NMPattern(n, m)) == good / total


@pytest.mark.parametrize("shape", [(7, 5), (8, 4), (3, 9), (16,), (5,), (2, 3, 6), (4, 1), (1, 4), (6, 2), (0, 4)])
@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8), NMPattern(2, 8)])
def test_weight_sparsity_of_a_dense_weight_is_the_counted_one(shape: tuple[int, ...], pattern: NMPattern) -> None:
    """The record's shortcut for weights without zeros gives the counted figures, float for float
    (the zero padding of a short last group can satisfy the pattern)."""
    dense = np.random.default_rng(len(shape)).uniform(1, 2, shape).astype(np.float32)
    got = weight_sparsity(dense, pattern=pattern)
    axes = [1, 0] if dense.ndim == 2 else [1] if dense.ndim > 1 else [0]
    counted = [nm_fraction(dense, a, pattern) for a in axes]
    assert got["pattern_fraction"] == round(max(counted), 6) and got["axis"] == axes[counted.index(max(counted))]
    assert got["zero_fraction"] == 0.0 and got["pattern"] is None
    if dense.size:  # with zeros the groups are counted: the zero fraction too
        dense.reshape(-1)[::3] = 0
        assert weight_sparsity(dense, pattern=pattern)["zero_fraction"] == round(float(np.mean(dense == 0)), 6)
