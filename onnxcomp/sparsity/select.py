"""Which channels a group keeps: importance scores, per-layer counts and a global allocation.

* ``l1`` / ``l2``: each source's per-channel weight norm (mean |w| or RMS over the channel's
  weights), min-max normalised per source and summed over the group's sources (AMCT's balanced L2
  norm); the lowest-scoring channels go.
* ``data``: the channels whose removal least increases the sinks' output error on calibration data
  (:func:`onnxcomp.sparsity.reconstruct.greedy_removal`).

In ``global`` scope one ratio is spread over all groups: every channel gets a score comparable
across layers (its norm relative to its group's mean norm, or its relative output error), the
lowest-scoring channels of the whole model are removed first, and no group loses more than
``max_ratio`` of its channels or its last channel.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.sparsity.coupling import ChannelGroup
from onnxcomp.sparsity.masks import channel_norms, minmax_normalize


def norm_scores(group: ChannelGroup, criterion: str) -> np.ndarray:
    """Summed min-max-normalised norms of the group's sources (higher = more important)."""
    total = np.zeros(group.channels)
    for source in group.sources:
        total += minmax_normalize(channel_norms(source.weight, source.axis, criterion))
    return total


def relative_norms(group: ChannelGroup, criterion: str) -> np.ndarray:
    """Per-channel norms relative to the group mean, averaged over sources (global scope)."""
    total = np.zeros(group.channels)
    for source in group.sources:
        norms = channel_norms(source.weight, source.axis, criterion)
        mean = float(norms.mean())
        total += norms / mean if mean > 0 else norms
    return total / max(len(group.sources), 1)


def lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices of the ``count`` lowest scores (ties: lower index removed first)."""
    return np.sort(np.argsort(scores, kind="stable")[:count]).astype(np.int64)


def keep_from_removed(channels: int, removed: np.ndarray) -> np.ndarray:
    return np.setdiff1d(np.arange(channels), removed).astype(np.int64)


def global_ratios(scores: list[np.ndarray], ratio: float, max_ratio: float, round_to: int = 1) -> list[float]:
    """Per-group ratios removing about ``ratio`` of all channels, lowest global scores first.

    Channels go in chunks that keep every group's count a multiple of ``round_to``: the chunk
    with the lowest mean score is removed next, while no group loses more than ``max_ratio`` (nor
    its last block) and until the target is reached (a last chunk is taken only if it lands closer).
    """
    sizes = [len(s) for s in scores]
    ordered = [np.sort(s) for s in scores]
    removed = [0] * len(sizes)
    target = int(round(ratio * sum(sizes)))

    def chunk(g: int) -> tuple[float, int] | None:
        n = sizes[g]
        keep = ((n - removed[g] - 1) // round_to) * round_to
        if keep < 1 or n - keep > int(np.floor(max_ratio * n)):
            return None
        return float(ordered[g][removed[g] : n - keep].mean()), n - keep - removed[g]

    total = 0
    while total < target:
        options = [(c, g) for g in range(len(sizes)) if (c := chunk(g)) is not None]
        if not options:
            break
        (_, size), g = min(options)
        if total + size - target > target - total:
            break
        removed[g] += size
        total += size
    return [r / n if n else 0.0 for r, n in zip(removed, sizes, strict=True)]
