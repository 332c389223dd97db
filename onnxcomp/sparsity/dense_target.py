"""n:m sparsity fitted to the dense model's output (``sparsify_2to4`` ``target = "dense"``).

Plain sequential SparseGPT makes each layer reproduce *its own* dense output on the input it now
sees (``X_s W`` close to ``X_s W_d``), so the error every earlier layer made is carried forward
and compounds over depth. Here each layer is instead fitted to the dense model's output of that
layer on the same calibration batch, ``Y_d = X_d W_d + b_d``:

    min ||X_s W + b - Y_d||^2   subject to W being n:m sparse,

where ``X_s`` is the layer's input in the model whose earlier layers are already sparse. The
statistics are streamed and mergeable (:class:`DenseTargetStats`: ``[X_s 1]^T [X_s 1]``,
``[X_s 1]^T Y_d`` and ``||Y_d||^2`` at sampled output positions, float64, per Conv group).

:func:`fit_dense_target` then solves, per group:

1. With a free bias (the layer has, or can take, a per-output-channel bias) the bias is eliminated
   exactly: ``H`` and ``C`` are centred (the Schur complement of the bias column), so the mask
   and the update target the error a refit bias cannot absorb. Without one the fixed bias is
   subtracted from the target.
2. The unconstrained least-squares target ``W* = (H + lambda I)^-1 (C + lambda W_d)`` (a ridge
   towards the dense weights, ``lambda = ridge * mean(diag H)``, raised by ``(d + 1) / rows`` when
   there are fewer rows than unknowns, as for the globally pooled input of a squeeze-excitation
   block, so scarce data never pulls directions it did not observe away from the dense model).
3. SparseGPT's mask and compensating update (:func:`onnxcomp.sparsity.sparsegpt.sparsegpt_nm`) on
   ``W*`` with ``H``: minimising ``||X_s (W - W*)||^2`` over n:m ``W`` is the same problem as
   minimising ``||X_s W - Y_d||^2`` (they differ by a constant), so OBS applies unchanged.
4. Optionally an exact least-squares refit of each output row's kept weights on the fixed mask
   (``refit_kept``: the OBS sweep freezes each column when it passes it; the refit does not).
5. The bias: ``mean(Y_d) - mean(X_s) W`` per output channel (the mean error corrected).

The result is never worse on the calibration data than the dense weights pruned by magnitude with
the dense bias (if it were, that is what is returned, with ``method = "magnitude"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxcomp import ir
from onnxcomp.calibration.gram import (
    conv_groups,
    design_rows,
    output_count,
    output_rows,
    row_count,
    sample_rows,
)
from onnxcomp.errors import CalibrationError
from onnxcomp.formats.nm import NMPattern, apply_nm
from onnxcomp.ir import describe
from onnxcomp.sparsity.sparsegpt import MaskRule, matrix_axes, sparsegpt_nm

__all__ = ["DenseTargetStats", "DenseFit", "fit_dense_target", "masked_refit"]


class DenseTargetStats:
    """Streaming, mergeable statistics of ``min ||[X_s 1] theta - Y_d||^2`` for one layer.

    Per Conv group ``g`` (one for every other layer): ``h[g] = A^T A`` with ``A = [X_s 1]`` (the
    design columns of the group, then the ones column), ``c[g] = A^T Y_d`` (the group's output
    channels), and ``yy = ||Y_d||^2``, summed over the sampled rows (float64). ``update`` takes the
    layer's input in the sparse model and its output in the dense model on the same batch; the
    rows are output positions sampled with ``rng`` (at most ``max_rows`` per batch, ``None``: all).
    """

    def __init__(self, node: ir.Node, max_rows: int | None, rng: np.random.Generator) -> None:
        self.node = node
        self.max_rows = max_rows
        self.rng = rng
        self.groups = conv_groups(node)
        self.h: np.ndarray | None = None  # (g, d+1, d+1)
        self.c: np.ndarray | None = None  # (g, d+1, cout/g)
        self.yy = 0.0
        self.rows = 0

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add one batch: ``x`` the layer's input (sparse model), ``y`` its output (dense model)."""
        total = output_count(self.node, np.shape(y))
        if row_count(self.node, np.shape(x)) != total:
            raise CalibrationError(
                f"{describe(self.node)}: input {np.shape(x)} and dense output {np.shape(y)} have different positions"
            )
        index = sample_rows(total, self.max_rows, self.rng)
        g = self.groups
        a = design_rows(self.node, x, index).reshape(len(index), g, -1)
        a = np.concatenate([a, np.ones((len(index), g, 1))], axis=2)
        yr = output_rows(self.node, y, index).reshape(len(index), g, -1)
        h = np.einsum("sgi,sgj->gij", a, a)
        c = np.einsum("sgi,sgj->gij", a, yr)
        self._add(h, c, float(np.sum(yr * yr)), len(index))

    def merge(self, other: DenseTargetStats) -> None:
        """Add another collector's statistics (of the same layer) to this one."""
        if other.h is not None and other.c is not None:
            self._add(other.h, other.c, other.yy, other.rows)

    def _add(self, h: np.ndarray, c: np.ndarray, yy: float, rows: int) -> None:
        if self.h is None or self.c is None:
            self.h, self.c = h.copy(), c.copy()
        elif self.h.shape != h.shape or self.c.shape != c.shape:
            raise CalibrationError(f"{describe(self.node)}: the design width changed between batches")
        else:
            self.h += h
            self.c += c
        self.yy += yy
        self.rows += rows

    def means(self) -> tuple[np.ndarray, np.ndarray, float]:
        """``(H, C, mean ||y||^2)``: the sums divided by the number of rows."""
        if self.h is None or self.c is None or self.rows == 0:
            raise CalibrationError(f"{describe(self.node)}: no calibration rows were observed")
        return self.h / self.rows, self.c / self.rows, self.yy / self.rows


@dataclass
class DenseFit:
    """A layer fitted to the dense target: its weight (layer layout), bias and relative errors."""

    weight: np.ndarray
    bias: np.ndarray | None  # per output channel; None: the bias is left as it is
    method: str  # "sparsegpt" (dense target) or "magnitude" (when that was better)
    errors: dict[str, float] = field(default_factory=dict)


def _as_matrix(w: np.ndarray, axes: list[int]) -> np.ndarray:
    moved = np.transpose(np.asarray(w, np.float64), axes)
    return moved.reshape(moved.shape[0], -1)


def _from_matrix(m: np.ndarray, w: np.ndarray, axes: list[int]) -> np.ndarray:
    shape = tuple(np.shape(w)[a] for a in axes)
    return np.ascontiguousarray(np.transpose(m.reshape(shape), np.argsort(axes)))


def _error(m: np.ndarray, b: np.ndarray, h: np.ndarray, c: np.ndarray, yy: float) -> float:
    """Mean squared error ``||[X 1] [m^T; b] - Y||^2 / rows`` of one group."""
    theta = np.vstack([m.T, b[None, :]])
    return float(np.sum(theta * (h @ theta)) - 2.0 * np.sum(theta * c) + yy)


def masked_refit(m: np.ndarray, keep: np.ndarray, h: np.ndarray, c: np.ndarray, lam: float) -> np.ndarray:
    """Rows ``m`` (cout, d) refit exactly on their kept columns: ``min ||X m_r - y_r||^2 + lam ||m_r - m_r0||^2``.

    ``h`` is ``X^T X`` (d, d), ``c`` is ``X^T Y`` (d, cout); the ridge pulls towards the given rows.
    Rows whose mask is the same share one factorisation.
    """
    out = np.where(keep, m, 0.0)
    d = m.shape[1]
    patterns: dict[bytes, list[int]] = {}
    for r in range(m.shape[0]):
        patterns.setdefault(np.packbits(keep[r]).tobytes(), []).append(r)
    for members in patterns.values():
        rows = np.asarray(members, dtype=np.int64)
        cols = np.flatnonzero(keep[rows[0]])
        if len(cols) == 0:
            continue
        a = h[np.ix_(cols, cols)] + lam * np.eye(len(cols))
        rhs = c[cols][:, rows] + lam * m[np.ix_(rows, cols)].T
        try:
            sol = np.linalg.solve(a, rhs)
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(sol).all():
            out[np.ix_(rows, cols)] = sol.T
    assert out.shape[1] == d
    return out


def fit_dense_target(
    weight: np.ndarray,
    bias: np.ndarray | None,
    stats: DenseTargetStats,
    pattern: NMPattern,
    *,
    channel_axis: int,
    reduction_axis: int,
    fit_bias: bool,
    damp: float = 0.01,
    ridge: float = 0.1,
    block: int = 128,
    refit_kept: bool = False,
    mask_rule: MaskRule = "obs",
) -> DenseFit:
    """``weight`` made n:m sparse so the layer's output on the sparse model's input matches the dense one.

    ``weight`` and ``bias`` are the dense layer's (``bias``: the effective per-output-channel bias
    added to ``X W``, None for none); ``fit_bias``: a new bias may be written (else ``bias`` stays
    and ``DenseFit.bias`` is None). Output channels are split into ``stats.groups`` equal
    consecutive groups. Errors are relative to the dense output energy on the calibration data:
    ``dense`` (the dense layer on the sparse model's input: the error upstream), ``magnitude``
    (the dense weights pruned by magnitude) and ``fit`` (the result).
    """
    axes = matrix_axes(np.ndim(weight), channel_axis, reduction_axis)
    m0 = _as_matrix(weight, axes)
    cout, d = m0.shape
    h_all, c_all, yy_all = stats.means()
    groups = h_all.shape[0]
    if h_all.shape[1] != d + 1 or cout % groups:
        raise CalibrationError(f"{describe(stats.node)}: the statistics do not fit the weight ({cout} x {d})")
    per = cout // groups
    b0 = np.zeros(cout) if bias is None else np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (cout,))
    mag = _as_matrix(apply_nm(weight, reduction_axis, pattern), axes)
    star = np.empty_like(m0)
    hs, cs = [], []
    for g in range(groups):
        part = slice(g * per, (g + 1) * per)
        h, c = h_all[g], c_all[g]
        hx, hb, c_x, c_b = h[:d, :d], h[:d, d], c[:d], c[d]
        if fit_bias and h[d, d] > 0:  # eliminate the bias: centred statistics
            hx = hx - np.outer(hb, hb) / h[d, d]
            c_x = c_x - np.outer(hb, c_b) / h[d, d]
        else:  # the bias is fixed: remove it from the target
            c_x = c_x - np.outer(hb, b0[part])
        hx = (hx + hx.T) / 2.0
        scarce = max(1.0, (d + 1) / stats.rows)  # fewer rows than unknowns (an SE block's pooled input)
        lam = ridge * scarce * float(np.mean(np.diag(hx))) + 1e-12
        try:
            sol = np.linalg.solve(hx + lam * np.eye(d), c_x + lam * m0[part].T)
        except np.linalg.LinAlgError:
            sol = m0[part].T
        star[part] = sol.T if np.isfinite(sol).all() else m0[part]
        hs.append(hx)
        cs.append((c_x, lam))
    sparse_w = sparsegpt_nm(
        _from_matrix(star, weight, axes),
        pattern,
        np.stack(hs),
        channel_axis=channel_axis,
        reduction_axis=reduction_axis,
        damp=damp,
        block=block,
        mask_rule=mask_rule,
    )
    sparse = _as_matrix(sparse_w, axes)
    keep = sparse != 0
    if refit_kept:
        for g in range(groups):
            part = slice(g * per, (g + 1) * per)
            c_x, lam = cs[g]
            sparse[part] = masked_refit(sparse[part], keep[part], hs[g], c_x, lam)
    new_b = b0.copy()
    if fit_bias:
        for g in range(groups):
            part = slice(g * per, (g + 1) * per)
            h, c = h_all[g], c_all[g]
            if h[d, d] > 0:
                new_b[part] = (c[d] - h[d, :d] @ sparse[part].T) / h[d, d]
    energy = max(yy_all, 1e-30)

    def rel(mm: np.ndarray, bb: np.ndarray) -> float:
        total = sum(
            _error(mm[g * per : (g + 1) * per], bb[g * per : (g + 1) * per], h_all[g], c_all[g], 0.0)
            for g in range(groups)
        )
        return max(total + yy_all, 0.0) / energy

    errors = {"dense": rel(m0, b0), "magnitude": rel(mag, b0), "fit": rel(sparse, new_b)}
    if not (np.isfinite(sparse).all() and np.isfinite(new_b).all()) or errors["fit"] > errors["magnitude"]:
        errors["fit"] = errors["magnitude"]
        return DenseFit(np.asarray(apply_nm(weight, reduction_axis, pattern)), None, "magnitude", errors)
    out = _from_matrix(sparse * keep, weight, axes).astype(np.asarray(weight).dtype)
    return DenseFit(out, new_b if fit_bias else None, "sparsegpt", errors)
