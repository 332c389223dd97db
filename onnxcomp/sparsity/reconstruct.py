"""Data-driven channel choice and least-squares reconstruction of consumers on calibration data.

For a sink ``y = X Wm + b`` (:mod:`onnxcomp.sparsity.gram`) with ``H = [X 1]^T [X 1]`` summed
over the calibration data and ``theta = [Wm; b]``:

* the output error of parameters ``t`` is ``tr((t - theta)^T H (t - theta))``; it is reported
  relative to the output energy ``tr(theta^T H theta)``;
* **selection** (criterion ``data``): removing channel set S without refitting the weights costs
  ``1_S^T G 1_S`` with ``G[c, d] = sum of (Hc o Wm Wm^T)`` over the columns of channels c and d
  (``Hc`` is ``H`` centred when the bias can absorb each channel's mean, raw otherwise); ``G`` is
  summed over the group's sinks (each relative to its output energy) and S is grown greedily
  (ThiNet);
* **reconstruction**: the kept columns K (and the bias when the sink may refit it) are refit by
  ridge least squares, ``t_K = (H_KK + lambda I)^-1 H_K: theta``, so the pruned sink's output
  matches the unpruned one as closely as possible on the calibration data. A refit that does not
  lower the error (it always should) is dropped in favour of plain slicing.

Statistics come from the model *before* pruning, in one calibration pass for all sinks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxcomp.pipeline import PassContext
from onnxcomp.quant.calibrator import Calibrator
from onnxcomp.sparsity.gram import Fanout, GramAccumulator, SinkMatrix


@dataclass
class RefitResult:
    wm: np.ndarray  # (kept columns, Cout)
    bias: np.ndarray | None
    error_pruned: float  # relative output error of plain slicing
    error_refit: float  # relative output error after the refit


def collect(
    model: onnx.ModelProto, matrices: list[SinkMatrix], ctx: PassContext, max_rows: int, max_batches: int | None
) -> dict[int, GramAccumulator]:
    """Stream the calibration data once; an accumulator per sink (keyed by ``id(node)``)."""
    accumulators: dict[int, GramAccumulator] = {}
    by_tensor: dict[str, list[GramAccumulator]] = {}
    for sm in matrices:
        acc = GramAccumulator(sm, max_rows, ctx.rng(f"prune_channels:{sm.node.name}"))
        accumulators[id(sm.node)] = acc
        by_tensor.setdefault(sm.node.inputs[0].name, []).append(acc)
    factories = {name: (lambda accs=accs: Fanout(accs)) for name, accs in by_tensor.items()}
    assert ctx.calibration is not None
    Calibrator(model, factories).run(ctx.calibration(), max_batches=max_batches, progress=ctx.progress.enabled)  # type: ignore[arg-type]
    return accumulators


def _energy(acc: GramAccumulator) -> float:
    theta = acc.sm.theta
    return max(float(np.sum(theta * (acc.h @ theta))), 1e-30)


def relative_error(acc: GramAccumulator, theta: np.ndarray) -> float:
    """Output error of parameters ``theta`` against the sink's own, relative to its output energy."""
    delta = theta - acc.sm.theta
    return float(np.sum(delta * (acc.h @ delta))) / _energy(acc)


def removal_gram(acc: GramAccumulator, channels: int) -> np.ndarray:
    """``G`` (channels x channels) of one sink, relative to its output energy."""
    sm, h = acc.sm, acc.h
    d = len(sm.owner)
    hx = h[:d, :d]
    if sm.intercept and h[d, d] > 0:
        mean = h[:d, d]
        hx = hx - np.outer(mean, mean) / h[d, d]
    m = hx * (sm.wm @ sm.wm.T)
    onehot = np.zeros((d, channels))
    onehot[np.arange(d), sm.owner] = 1.0
    return onehot.T @ m @ onehot / _energy(acc)


def greedy_removal(gram: np.ndarray, count: int) -> np.ndarray:
    """Channels to remove: grow the set S greedily by the smallest increase of ``1_S^T G 1_S``."""
    channels = gram.shape[0]
    removed: list[int] = []
    cross = np.zeros(channels)
    available = np.ones(channels, dtype=bool)
    diag = np.diag(gram)
    for _ in range(count):
        cost = np.where(available, diag + 2.0 * cross, np.inf)
        pick = int(np.argmin(cost))
        removed.append(pick)
        available[pick] = False
        cross += gram[:, pick]
    return np.array(sorted(removed), dtype=np.int64)


def refit(acc: GramAccumulator, keep: np.ndarray, damping: float) -> RefitResult | None:
    """Ridge least-squares refit of the kept columns (and bias); None when it does not help."""
    sm, h = acc.sm, acc.h
    d = len(sm.owner)
    theta = sm.theta
    cols = np.flatnonzero(np.isin(sm.owner, keep))
    idx = np.append(cols, d) if sm.intercept else cols
    a = h[np.ix_(idx, idx)].copy()
    if len(cols):
        lam = damping * float(np.mean(np.diag(a)[: len(cols)])) + 1e-12
        a[np.arange(len(cols)), np.arange(len(cols))] += lam
    rhs = h[idx, :] @ theta if sm.intercept else h[np.ix_(idx, np.arange(d))] @ sm.wm
    try:
        sol = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
    pruned = theta.copy()
    pruned[np.setdiff1d(np.arange(d), cols)] = 0.0
    new = pruned.copy()
    new[idx] = sol
    before, after = relative_error(acc, pruned), relative_error(acc, new)
    import os
    if acc.rows < float(os.environ.get("MINR", "0")) * len(idx): return None
    if not (np.isfinite(sol).all() and after < before):
        return None
    return RefitResult(sol[: len(cols)], sol[-1] if sm.intercept else None, before, after)
