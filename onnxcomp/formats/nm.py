"""N:M structured sparsity as a weight format: masks along a reduction axis and pattern checks.

An n:m mask keeps, in every group of ``m`` consecutive weights along the reduction (input-channel)
axis, the ``n`` of largest magnitude. An axis whose length is not a multiple of ``m`` is padded
with zeros to the next multiple for the selection (the padding is then dropped); an axis of length
``<= n`` is left alone. Ties keep the lower index (a stable sort), so masks are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp.errors import ConfigError


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights (2:4 by default)."""

    n: int = 2
    m: int = 4

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(text: str) -> NMPattern:
    """``"2:4"`` -> NMPattern(2, 4); ConfigError for anything but ``n:m`` with 0 < n < m."""
    head, sep, tail = str(text).strip().partition(":")
    try:
        n, m = int(head), int(tail)
    except ValueError:
        n = m = 0
    if not sep or not 0 < n < m:
        raise ConfigError(f"bad sparsity pattern {text!r}; use n:m with 0 < n < m, e.g. 2:4")
    return NMPattern(n, m)


def _grouped(w: np.ndarray, axis: int, m: int) -> tuple[np.ndarray, int]:
    """``|w|`` with ``axis`` moved last, zero-padded to a multiple of ``m``, split as (..., G, m)."""
    moved = np.moveaxis(np.abs(w.astype(np.float64)), axis, -1)
    length = moved.shape[-1]
    padded = -(-length // m) * m
    if padded != length:
        moved = np.concatenate([moved, np.zeros((*moved.shape[:-1], padded - length))], axis=-1)
    return moved.reshape(*moved.shape[:-1], padded // m, m), length


def nm_mask(w: np.ndarray, axis: int, pattern: NMPattern) -> np.ndarray:
    """Boolean mask (True = keep) of the n:m pattern of ``w`` along ``axis`` (shape of ``w``)."""
    axis = axis % w.ndim
    if w.shape[axis] <= pattern.n:
        return np.ones(w.shape, dtype=bool)
    groups, length = _grouped(w, axis, pattern.m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., : pattern.n], True, axis=-1)
    keep = keep.reshape(*keep.shape[:-2], -1)[..., :length]
    return np.moveaxis(keep, -1, axis)


def apply_nm(w: np.ndarray, axis: int, pattern: NMPattern) -> np.ndarray:
    """``w`` with the weights outside its n:m mask set to zero (same dtype and shape)."""
    return np.where(nm_mask(w, axis, pattern), w, np.zeros((), dtype=w.dtype)).astype(w.dtype)


def nm_fraction(w: np.ndarray, axis: int, pattern: NMPattern) -> float:
    """Fraction of the (zero-padded) groups along ``axis`` with at most ``n`` non-zeros."""
    return nonzero_mask_fraction(nonzero_mask(w), axis, pattern)


def nonzero_mask(w: np.ndarray) -> np.ndarray:
    """``w != 0`` as one byte (0 / 1) an element: what :func:`nonzero_mask_fraction` counts on."""
    return (np.asarray(w) != 0).view(np.uint8)


def nonzero_mask_fraction(mask: np.ndarray, axis: int, pattern: NMPattern) -> float:
    """:func:`nm_fraction` of the weight whose :func:`nonzero_mask` is ``mask``.

    Every quant record computes it for every weight, on both candidate axes, so it avoids a
    transposed copy: the groups are read in place as (before, groups, m, after) and their counts
    summed over m strided slices; along a contiguous last axis, a group of four bytes is one
    uint32 whose byte sum a multiply leaves in its top byte.
    """
    axis = axis % mask.ndim
    length = mask.shape[axis]
    before, after = (
        int(np.prod(mask.shape[:axis], dtype=np.int64)),
        int(np.prod(mask.shape[axis + 1 :], dtype=np.int64)),
    )
    if mask.size == 0:
        return 1.0
    rows = mask.reshape(before, length, after)
    padded = -(-length // pattern.m) * pattern.m
    if padded != length:
        rows = np.concatenate([rows, np.zeros((before, padded - length, after), np.uint8)], axis=1)
    groups = rows.reshape(before, padded // pattern.m, pattern.m, after)
    if after == 1 and pattern.m == 4 and groups.flags.c_contiguous:
        words = groups.reshape(-1).view(np.uint32)  # contiguous: one uint32 per group, no copy
        nonzero = (words * np.uint32(0x01010101)) >> np.uint32(24)  # sum of the four 0/1 bytes
    else:
        nonzero = groups[:, :, 0].astype(np.int32)
        for j in range(1, pattern.m):  # m strided adds: numpy's reductions over a short axis are slow
            nonzero += groups[:, :, j]
    return float(np.count_nonzero(nonzero <= pattern.n) / nonzero.size)


def is_nm_sparse(w: np.ndarray, axis: int, pattern: NMPattern = NMPattern()) -> bool:
    """True when every group satisfies the pattern and the axis is long enough to be sparsified."""
    return w.shape[axis % w.ndim] > pattern.n and nm_fraction(w, axis, pattern) == 1.0
