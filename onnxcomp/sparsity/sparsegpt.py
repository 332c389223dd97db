"""SparseGPT for n:m sparsity: the mask and the compensating update from the layer's Hessian.

SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774) prunes a layer's weight one input column
at a time with the optimal-brain-surgeon (OBS) update: with ``H = mean(X^T X)`` of the layer's
design matrix (:class:`onnxcomp.calibration.gram.InputGram`) and ``U`` the upper Cholesky factor
of the damped ``H^-1`` (:func:`onnxcomp.calibration.gram.damped_inverse_cholesky`), removing
weight ``w_j`` of an output row costs ``w_j^2 / U_jj^2`` (its saliency) and is compensated by
``w[j+1:] -= w_j / U_jj * U[j, j+1:]`` on the columns not yet visited. For n:m, the mask of every
group of ``m`` columns is chosen when the sweep reaches the group (per output row: the ``m - n``
smallest saliencies of the already-updated weights are pruned), so earlier compensation is taken
into account. Updates are applied lazily in blocks of about ``block`` columns aligned to groups.

The groups run along the reduction (input-channel) axis at every other index, as
:func:`onnxcomp.formats.nm.apply_nm` does (Conv: ``m`` consecutive input channels at one
``(cout, kh, kw)``; an axis not a multiple of ``m`` ends in a shorter group, pruned to at most
``n``). Columns whose input is always zero on the data (``diag H == 0``) are set to zero, as
SparseGPT does.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.calibration.gram import damped_inverse_cholesky, dead_columns
from onnxcomp.errors import ConfigError
from onnxcomp.formats.nm import NMPattern

__all__ = ["sparsegpt_nm", "output_error", "matrix_axes"]


def matrix_axes(ndim: int, channel_axis: int, reduction_axis: int) -> list[int]:
    """The axis order that views a weight as the ``(Cout, reduction * rest)`` matrix SparseGPT works on."""
    c, r = channel_axis % ndim, reduction_axis % ndim
    return [c, r] + [a for a in range(ndim) if a not in (c, r)]


def _groups(reduction: int, rest: int, m: int) -> list[tuple[int, int]]:
    """(start, length) of the n:m groups in the kernel-major column order ``(rest, reduction)``."""
    return [(k * reduction + s, min(m, reduction - s)) for k in range(rest) for s in range(0, reduction, m)]


def _blocks(groups: list[tuple[int, int]], block: int) -> list[tuple[int, int]]:
    """Consecutive column ranges of about ``block`` columns that never split a group."""
    out, start, end = [], 0, 0
    for s, length in groups:
        end = s + length
        if end - start >= block:
            out.append((start, end))
            start = end
    if end > start:
        out.append((start, end))
    return out


def _prune_rows(
    w: np.ndarray, h: np.ndarray, pattern: NMPattern, reduction: int, rest: int, damp: float, block: int
) -> np.ndarray:
    """SparseGPT on rows ``w`` (float64, (rows, reduction*rest) in ``(reduction, rest)`` column order)."""
    d = w.shape[1]
    perm = np.arange(d).reshape(reduction, rest).T.reshape(-1)  # kernel-major: groups are consecutive
    h = h[np.ix_(perm, perm)]
    w = w[:, perm].copy()
    w[:, dead_columns(h)] = 0.0
    u = damped_inverse_cholesky(h, damp)
    diag = np.diag(u)
    groups = _groups(reduction, rest, pattern.m)
    starts = {s: length for s, length in groups}
    rows = np.arange(w.shape[0])[:, None]
    keep = np.ones(w.shape, dtype=bool)
    for b1, b2 in _blocks(groups, block):
        err = np.zeros((w.shape[0], b2 - b1))
        for j in range(b1, b2):
            length = starts.get(j, 0)
            if length > pattern.n:
                saliency = w[:, j : j + length] ** 2 / diag[j : j + length] ** 2
                pruned = np.argsort(saliency, axis=1, kind="stable")[:, : length - pattern.n]
                keep[rows, j + pruned] = False
            q = np.where(keep[:, j], w[:, j], 0.0)
            e = (w[:, j] - q) / u[j, j]
            w[:, j] = q
            w[:, j + 1 : b2] -= np.outer(e, u[j, j + 1 : b2])
            err[:, j - b1] = e
        w[:, b2:] -= err @ u[b1:b2, b2:]
    out = np.empty_like(w)
    out[:, perm] = w
    return out


def sparsegpt_nm(
    w: np.ndarray,
    pattern: NMPattern,
    hessian: np.ndarray,
    *,
    channel_axis: int,
    reduction_axis: int,
    damp: float = 0.01,
    block: int = 128,
) -> np.ndarray:
    """``w`` made n:m sparse along ``reduction_axis`` by SparseGPT (same shape and dtype).

    ``hessian``: the mean ``X^T X`` of the layer's design matrix with columns in the order of the
    weight as a matrix (the reduction axis, then the remaining non-channel axes: a Conv's
    ``W.reshape(Cout, -1)``), ``(d, d)``, or ``(group, d, d)`` for a grouped Conv (output channels
    split into equal consecutive groups). Pruned weights are exactly zero; every group has at most
    ``n`` non-zeros. Raises ConfigError when the Hessian does not fit the weight.
    """
    if block < 1:
        raise ConfigError(f"SparseGPT block must be >= 1, got {block}")
    axes = matrix_axes(w.ndim, channel_axis, reduction_axis)
    moved = np.transpose(np.asarray(w, np.float64), axes)
    reduction = moved.shape[1]
    rest = int(np.prod(moved.shape[2:], dtype=np.int64))
    m = moved.reshape(moved.shape[0], -1)
    h = np.asarray(hessian, np.float64)
    blocks = h[None] if h.ndim == 2 else h
    rows, d = m.shape
    if blocks.ndim != 3 or blocks.shape[1:] != (d, d) or rows % blocks.shape[0]:
        raise ConfigError(f"Hessian of shape {h.shape} does not fit the weight's matrix ({rows} rows, {d} columns)")
    if reduction <= pattern.n:
        return np.array(w, copy=True)
    per = rows // blocks.shape[0]
    out = np.empty_like(m)
    for g, hg in enumerate(blocks):
        part = slice(g * per, (g + 1) * per)
        out[part] = _prune_rows(m[part], hg, pattern, reduction, rest, damp, block)
    back = np.transpose(out.reshape(moved.shape), np.argsort(axes))
    return np.ascontiguousarray(back).astype(np.asarray(w).dtype)


def output_error(
    w: np.ndarray, new: np.ndarray, hessian: np.ndarray, *, channel_axis: int, reduction_axis: int
) -> float:
    """Relative output error ``tr(D H D^T) / tr(W H W^T)`` (``D = W - new``) on the data behind ``hessian``."""
    axes = matrix_axes(np.ndim(w), channel_axis, reduction_axis)

    def mat(a: np.ndarray) -> np.ndarray:
        moved = np.transpose(np.asarray(a, np.float64), axes)
        return moved.reshape(moved.shape[0], -1)

    wm, dm = mat(w), mat(w) - mat(new)
    h = np.asarray(hessian, np.float64)
    blocks = h[None] if h.ndim == 2 else h
    per = wm.shape[0] // blocks.shape[0]
    num = den = 0.0
    for g, hg in enumerate(blocks):
        part = slice(g * per, (g + 1) * per)
        num += float(np.sum(dm[part] * (dm[part] @ hg)))
        den += float(np.sum(wm[part] * (wm[part] @ hg)))
    return num / den if den > 0 else 0.0
