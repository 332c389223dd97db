"""Per-channel activation statistics for scale migration (SmoothQuant, AWQ): exact and mergeable.

:class:`ChannelStats` observes one activation tensor along its channel ``axis`` (1 for a Conv
input ``(N, C, H, W)``, -1 for a MatMul/Gemm input ``(..., K)``). It keeps, in memory independent
of the number of batches:

* ``absmax``: the maximum of ``|x|`` per channel (SmoothQuant's ``max|X_j|``);
* the mean of ``|x|`` per channel (AWQ's activation salience), accumulated *exactly*: every
  float32 ``|x|`` is ``mantissa * 2^(e - 150)``, and the integer mantissas are summed per
  (channel, exponent) in int64, so the state after one batch, after several, or after merging two
  observers of the halves is the same integers, and :meth:`mean_abs` the same floats;
* ``count``: rows seen (a row is one position of every axis but the channel axis);
* a bounded reservoir of at most ``max_rows`` rows (vectors of length C) for the alpha/scale
  searches: the rows with the smallest seeded 64-bit hash of their bytes. The hash depends on a
  row's content only, so the kept rows do not depend on batching, order or merging (a bottom-k
  sample; duplicate rows share a key and may both be kept).

Non-finite values raise :class:`CalibrationError` (the calibrator names the tensor and batch).
"""

from __future__ import annotations

import numpy as np

from onnxcomp.errors import CalibrationError

__all__ = ["ChannelStats"]

_EXP_BINS = 256  # float32 biased exponents 0..255 (255 = Inf/NaN is rejected)
_MANT_BITS = 23
_EXP_OFFSET = 127 + _MANT_BITS  # |x| = mantissa * 2^(e - 150), e = max(biased exponent, 1)
_HASH_MIX = np.uint64(0x9E3779B97F4A7C15)


def _row_keys(rows: np.ndarray, multipliers: np.ndarray) -> np.ndarray:
    """A seeded 64-bit hash of each float32 row's bytes (integer arithmetic mod 2^64: exact)."""
    bits = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = (bits * multipliers).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(31)
        h *= _HASH_MIX
        h ^= h >> np.uint64(29)
    return h


class ChannelStats:
    """Per-channel absmax, exact mean |x|, row count and a deterministic row reservoir (see module doc)."""

    def __init__(self, axis: int, max_rows: int = 512, seed: int = 0) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
            raise ValueError(f"max_rows must be a non-negative integer, got {max_rows!r}")
        self.axis = axis
        self.max_rows = max_rows
        self.seed = seed
        self.count = 0
        self.absmax: np.ndarray | None = None
        self._mant_sums: np.ndarray | None = None  # (C, 256) int64
        self._rows: np.ndarray | None = None  # (R, C) float32, R <= max_rows
        self._keys: np.ndarray | None = None  # (R,) uint64
        self._multipliers: np.ndarray | None = None

    @property
    def channels(self) -> int | None:
        return None if self.absmax is None else int(self.absmax.shape[0])

    def _init(self, channels: int) -> None:
        self.absmax = np.zeros(channels, np.float32)
        self._mant_sums = np.zeros((channels, _EXP_BINS), np.int64)
        self._rows = np.zeros((0, channels), np.float32)
        self._keys = np.zeros(0, np.uint64)
        rng = np.random.default_rng([self.seed, channels])
        self._multipliers = rng.integers(0, 2**63, channels, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def update(self, x: np.ndarray) -> None:
        """Add every row of ``x`` (any float dtype; channel axis ``self.axis``)."""
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise CalibrationError(f"per-channel statistics need a floating-point tensor, got {arr.dtype}")
        if arr.ndim == 0:
            raise CalibrationError("per-channel statistics need a tensor with a channel axis, got a scalar")
        rows = np.moveaxis(arr.astype(np.float32, copy=False), self.axis, -1).reshape(-1, arr.shape[self.axis])
        if self.absmax is None:
            self._init(rows.shape[1])
        elif rows.shape[1] != self.channels:
            raise CalibrationError(f"channel axis has {rows.shape[1]} channels, earlier batches had {self.channels}")
        if rows.shape[0] == 0:
            return
        if not np.isfinite(rows).all():
            raise CalibrationError(f"non-finite values (NaN or Inf) among {rows.size} values")
        assert self.absmax is not None and self._mant_sums is not None
        mag = np.abs(rows)
        self.absmax = np.maximum(self.absmax, mag.max(axis=0))
        bits = mag.view(np.uint32)
        exponent = (bits >> np.uint32(_MANT_BITS)).astype(np.int64)
        mantissa = (bits & np.uint32((1 << _MANT_BITS) - 1)).astype(np.int64) | np.where(
            exponent > 0, 1 << _MANT_BITS, 0
        )
        channels = rows.shape[1]
        index = np.arange(channels, dtype=np.int64) * _EXP_BINS + np.maximum(exponent, 1)
        # Chunks keep every float64 partial sum below 2^53 (24-bit mantissas): the sums are exact.
        step = 1 << 28
        for start in range(0, rows.shape[0], step):
            part = np.bincount(
                index[start : start + step].ravel(),
                weights=mantissa[start : start + step].ravel().astype(np.float64),
                minlength=channels * _EXP_BINS,
            )
            self._mant_sums += part.astype(np.int64).reshape(channels, _EXP_BINS)
        self.count += rows.shape[0]
        if self.max_rows:
            assert self._multipliers is not None
            self._keep(rows, _row_keys(rows, self._multipliers))

    def _keep(self, rows: np.ndarray, keys: np.ndarray) -> None:
        assert self._rows is not None and self._keys is not None
        all_rows = np.concatenate([self._rows, rows])
        all_keys = np.concatenate([self._keys, keys])
        # Equal keys mean equal rows (bar a 64-bit collision), so the kept rows do not depend on
        # the arrival order.
        order = np.argsort(all_keys, kind="stable")[: self.max_rows]
        self._rows = np.ascontiguousarray(all_rows[order])
        self._keys = all_keys[order]

    def merge(self, other: ChannelStats) -> None:
        """Fold ``other`` (same axis, channels, max_rows and seed) into this observer, exactly."""
        if (other.axis, other.max_rows, other.seed) != (self.axis, self.max_rows, self.seed):
            raise CalibrationError("cannot merge ChannelStats with different axis, max_rows or seed")
        if other.absmax is None:
            return
        if self.absmax is None:
            self._init(int(other.absmax.shape[0]))
        if other.channels != self.channels:
            raise CalibrationError(f"cannot merge {other.channels} channels into {self.channels}")
        assert self._mant_sums is not None and other._mant_sums is not None and self.absmax is not None
        self.absmax = np.maximum(self.absmax, other.absmax)
        self._mant_sums = self._mant_sums + other._mant_sums
        self.count += other.count
        if self.max_rows and other._rows is not None and other._keys is not None:
            self._keep(other._rows, other._keys)

    def mean_abs(self) -> np.ndarray:
        """Mean of |x| per channel (float64, shape (C,)); CalibrationError before any row."""
        if self._mant_sums is None or self.count == 0:
            raise CalibrationError("no rows observed")
        exps = np.arange(_EXP_BINS) - _EXP_OFFSET
        exps[0] = 1 - _EXP_OFFSET  # subnormals share exponent 1's scale (unused bin, kept zero)
        return np.ldexp(self._mant_sums.astype(np.float64), exps).sum(axis=1) / self.count

    def amax(self) -> np.ndarray:
        """max |x| per channel (float64, shape (C,)); CalibrationError before any row."""
        if self.absmax is None or self.count == 0:
            raise CalibrationError("no rows observed")
        return self.absmax.astype(np.float64)

    def rows(self) -> np.ndarray:
        """The reservoir, shape (R, C) float32 with R <= max_rows (ordered by hash key)."""
        if self._rows is None:
            raise CalibrationError("no rows observed")
        return self._rows
