"""Mergeable per-channel moments of activations (float64 sums in a fixed order: exact merges)."""

from __future__ import annotations

import numpy as np

from onnxcomp.errors import CalibrationError


class ChannelMean:
    """Mean of a tensor per channel (``axis``) over every batch and position seen.

    The state is a float64 sum and a count, so one pass over all batches, several passes merged,
    or shards merged in any grouping give the same mean up to float64 rounding of the sums.
    """

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        moved = np.moveaxis(np.asarray(x), self.axis, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        part = flat.sum(axis=0, dtype=np.float64)
        if self.sum is not None and part.shape != self.sum.shape:
            raise CalibrationError(f"{part.shape[0]} channels, earlier batches had {self.sum.shape[0]}")
        if not np.isfinite(part).all():
            raise CalibrationError("non-finite values")
        self.sum = part if self.sum is None else self.sum + part
        self.count += flat.shape[0]

    def merge(self, other: ChannelMean) -> None:
        if other.sum is None:
            return
        self.sum = other.sum.copy() if self.sum is None else self.sum + other.sum
        self.count += other.count

    def mean(self) -> np.ndarray:
        if self.sum is None or not self.count:
            raise CalibrationError("no data observed")
        return self.sum / self.count
