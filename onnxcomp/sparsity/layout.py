"""Where a group of channels sits in a tensor, tensor shapes on demand, and small constant folding.

A channel group of ``C`` channels occupies one axis of each tensor it flows through. Along that
axis, element ``(o*C + c)*inner + j`` (``o < outer``, ``j < inner``) belongs to channel ``c``: a
plain channel axis has ``outer = inner = 1``; ``Flatten`` of ``[N, C, H, W]`` gives the 2-D
``[N, C*H*W]`` with ``inner = H*W`` (each channel expands to its flattened positions).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Layout:
    """The channel axis of one tensor (``axis`` of ``rank``) and how channels expand along it."""

    axis: int
    rank: int
    channels: int
    outer: int = 1
    inner: int = 1

    @property
    def size(self) -> int:
        return self.outer * self.channels * self.inner

    @property
    def neg(self) -> int:
        """The axis counted from the end (what broadcasting aligns)."""
        return self.axis - self.rank

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.inner == 1

    def at_rank(self, rank: int) -> Layout:
        """The same channels in a tensor of ``rank`` aligned from the end (broadcasting)."""
        return replace(self, axis=rank + self.neg, rank=rank)

    def positions(self, keep: np.ndarray) -> np.ndarray:
        """Indices along the axis of the kept channels (sorted ``keep`` -> sorted indices)."""
        keep = np.asarray(keep, dtype=np.int64)
        o = np.arange(self.outer)[:, None, None]
        j = np.arange(self.inner)[None, None, :]
        return ((o * self.channels + keep[None, :, None]) * self.inner + j).reshape(-1)

    def owner(self) -> np.ndarray:
        """The channel of each index along the axis."""
        return (np.arange(self.size) // self.inner) % self.channels
