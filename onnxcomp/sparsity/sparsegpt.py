"""SparseGPT for n:m sparsity: the mask and the compensating update from the layer's Hessian.

SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774) prunes a layer's weight one input column
at a time with the optimal-brain-surgeon (OBS) update: with ``H = mean(X^T X)`` of the layer's
design matrix (:class:`onnxcomp.calibration.gram.InputGram`) and ``U`` the upper Cholesky factor
of the damped ``H^-1`` (:func:`onnxcomp.calibration.gram.damped_inverse_cholesky`), removing
weight ``w_j`` of an output row costs ``w_j^2 / U_jj^2`` (its saliency) and is compensated by
``w[j+1:] -= w_j / U_jj * U[j, j+1:]`` on the columns not yet visited. For n:m, the mask of every
group of ``m`` columns is chosen when the sweep reaches the group, so earlier compensation is taken
into account. Per output row, the default rule ``"obs"`` tries every way to prune ``m - n`` of the
group (6 for 2:4) and keeps the one whose sweep over the group costs least: the cost of each pruned
column is counted *after* the compensation the group's earlier columns moved onto it, which the
paper's rule (``"saliency"``: prune the ``m - n`` smallest saliencies, all read before the group's
sweep) ignores. On ppocr_cls 2:4 this lifts the top-1 kept from 0.935-0.957 of fp32 to 0.954-0.973
over five calibration seeds. Updates are applied lazily in blocks of about ``block`` columns
aligned to groups.

The groups run along the reduction (input-channel) axis at every other index, as
:func:`onnxcomp.formats.nm.apply_nm` does (Conv: ``m`` consecutive input channels at one
``(cout, kh, kw)``; an axis not a multiple of ``m`` ends in a shorter group, pruned to at most
``n``). Columns whose input is always zero on the data (``diag H == 0``) are set to zero, as
SparseGPT does.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

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


MaskRule = Literal["obs", "saliency"]
MAX_CANDIDATES = 256  # groups with more ways to choose their kept columns (m = 16 and up) use the saliency rule


def _sweep_masks(length: int, n: int) -> np.ndarray:
    """Every way to prune ``length - n`` of ``length`` columns, as a (candidates, length) bool array."""
    combos = list(itertools.combinations(range(length), length - n))
    out = np.zeros((len(combos), length), dtype=bool)
    for i, pruned in enumerate(combos):
        out[i, list(pruned)] = True
    return out


def _obs_group_mask(w: np.ndarray, u: np.ndarray, n: int) -> np.ndarray:
    """Per row of ``w`` (rows, length): the pruned columns whose sweep costs least, as a bool array.

    The cost of a candidate is exactly what the OBS sweep over the group adds to the layer's error:
    visiting the columns in order, a pruned column costs ``e^2`` with ``e = w_k / U_kk`` and moves
    ``-e U[k, k+1:]`` onto the columns after it, so a later column's cost already includes the
    compensation the earlier ones pushed onto it (the saliency rule ranks the weights before any of
    that). ``u``: the group's (length, length) block of the upper Cholesky factor of ``H^-1``.
    """
    length = w.shape[1]
    masks = _sweep_masks(length, n)  # (c, length)
    cur = np.repeat(w[:, None, :], len(masks), axis=1)  # (rows, c, length)
    cost = np.zeros(cur.shape[:2])
    for k in range(length):
        e = np.where(masks[None, :, k], cur[:, :, k] / u[k, k], 0.0)
        cost += e * e
        cur[:, :, k + 1 :] -= e[:, :, None] * u[k, k + 1 :]
    best = np.argmin(cost, axis=1)  # ties: the first candidate (lowest column indices)
    return masks[best]


def _prune_rows(
    w: np.ndarray,
    h: np.ndarray,
    pattern: NMPattern,
    reduction: int,
    rest: int,
    damp: float,
    block: int,
    rule: MaskRule,
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
            if length > pattern.n and rule == "obs" and math.comb(length, pattern.n) <= MAX_CANDIDATES:
                keep[:, j : j + length] = ~_obs_group_mask(
                    w[:, j : j + length], u[j : j + length, j : j + length], pattern.n
                )
            elif length > pattern.n:
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
    mask_rule: MaskRule = "obs",
) -> np.ndarray:
    """``w`` made n:m sparse along ``reduction_axis`` by SparseGPT (same shape and dtype).

    ``hessian``: the mean ``X^T X`` of the layer's design matrix with columns in the order of the
    weight as a matrix (the reduction axis, then the remaining non-channel axes: a Conv's
    ``W.reshape(Cout, -1)``), ``(d, d)``, or ``(group, d, d)`` for a grouped Conv (output channels
    split into equal consecutive groups). Pruned weights are exactly zero; every group has at most
    ``n`` non-zeros. ``mask_rule``: ``"obs"`` picks each group's pruned columns by the exact cost of
    the sweep over the group (every ``m``-choose-``n`` candidate); ``"saliency"`` prunes the
    ``m - n`` smallest ``w^2 / U_jj^2`` (SparseGPT's rule). Raises ConfigError when the Hessian
    does not fit the weight.
    """
    if block < 1:
        raise ConfigError(f"SparseGPT block must be >= 1, got {block}")
    if mask_rule not in ("obs", "saliency"):
        raise ConfigError(f"SparseGPT mask rule must be 'obs' or 'saliency', got {mask_rule!r}")
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
        out[part] = _prune_rows(m[part], hg, pattern, reduction, rest, damp, block, mask_rule)
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
