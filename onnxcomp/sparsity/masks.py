"""Channel-pruning helpers: keep counts, per-channel weight norms and their normalisation.

The N:M pattern math lives in :mod:`onnxcomp.formats.nm`; skip-glob matching and weight axes in
:mod:`onnxcomp.ir`.
"""

from __future__ import annotations

import math

import numpy as np


def keep_count(channels: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept when pruning ``ratio`` of ``channels``, rounded UP to a multiple of ``round_to``.

    At least one channel is kept and never more than ``channels``.
    """
    keep = channels - int(round(channels * ratio))
    keep = -(-max(keep, 1) // max(round_to, 1)) * max(round_to, 1)
    return int(min(channels, max(keep, 1)))


def channel_norms(w: np.ndarray, axis: int, criterion: str) -> np.ndarray:
    """Per-channel weight norm along ``axis``: mean |w| (``l1``) or RMS (``l2``), float64.

    Dividing by the number of elements per channel (as AMCT's balanced L2 norm does) makes the
    scores of differently shaped layers comparable.
    """
    moved = np.moveaxis(w.astype(np.float64), axis % w.ndim, 0).reshape(w.shape[axis], -1)
    if criterion == "l1":
        return np.abs(moved).mean(axis=1)
    return np.sqrt(np.square(moved).mean(axis=1))


def minmax_normalize(scores: np.ndarray) -> np.ndarray:
    """Scores scaled to [0, 1] (all zeros when they are all equal)."""
    lo, hi = float(scores.min()), float(scores.max())
    return (scores - lo) / (hi - lo) if hi > lo and math.isfinite(hi - lo) else np.zeros_like(scores)
