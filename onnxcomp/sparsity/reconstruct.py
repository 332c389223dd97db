"""Data-driven channel choice and least-squares reconstruction of consumers on calibration data.

A sink computes ``y = [X 1] theta`` with ``theta = [Wm; b]`` (:mod:`onnxcomp.sparsity.gram`).

* **Selection** (criterion ``data``), on the unpruned model: removing channel set S without
  refitting costs ``1_S^T G 1_S``, where ``G[c, d]`` sums ``Hc o (Wm Wm^T)`` over the columns of
  channels c and d (``Hc``: the centred ``X^T X``, since a refit bias absorbs each channel's mean).
  ``G`` is summed over the group's sinks, each relative to its output energy, and S is grown
  greedily (ThiNet).
* **Reconstruction**, sequential: one calibration pass over the unpruned model records each
  sink's output ``Y`` at sampled positions (the target). After the channels are removed, the sinks
  are refit level by level in graph order (a sink's level is one more than that of the deepest
  sink upstream of it); per level, one pass over the *pruned* model (truncated to what the level
  needs) gives ``Hp = [X' 1]^T [X' 1]`` and ``[X' 1]^T Y`` at the same positions, where ``X'``
  is what the sink sees now: its kept channels, already carrying all upstream pruning and refits.
  The least-squares refit of weights and bias, ``t = (Hp + lambda I)^-1 ([X' 1]^T Y + lambda t0)``
  (a ridge towards the plain-removal weights ``t0``, so scarce calibration data cannot pull the
  weights anywhere wild), makes the sink's output match the unpruned model's as closely as
  possible; a refit that does not lower the error (it always should) is dropped.

Errors are reported relative to the sink's output energy ``||Y||^2`` on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.calibration.collect import Calibrator
from onnxcomp.errors import CalibrationError
from onnxcomp.framework.base import PassContext
from onnxcomp.ir import describe
from onnxcomp.sparsity.dense_collect import collect_pairs
from onnxcomp.sparsity.gram import (
    Fanout,
    GramAccumulator,
    SinkMatrix,
    augment,
    design_rows,
    output_count,
    output_rows,
    row_count,
    sample_rows,
    weight_from_matrix,
)
from onnxcomp.sparsity.rewrite import Refit, prune_sink

# --- selection ---------------------------------------------------------------------------------


def collect(
    model: onnx.ModelProto, matrices: list[SinkMatrix], ctx: PassContext, max_rows: int, max_batches: int | None
) -> dict[int, GramAccumulator]:
    """One calibration pass over ``model``: ``H`` of every sink's input, by ``id(node)``."""
    accs = {id(sm.node): GramAccumulator(sm, max_rows, ctx.rng(f"prune_channels:{sm.node.name}")) for sm in matrices}
    by_tensor: dict[str, list[GramAccumulator]] = {}
    for acc in accs.values():
        by_tensor.setdefault(acc.sm.node.inputs[0].name, []).append(acc)
    factories = {name: (lambda group=group: Fanout(group)) for name, group in by_tensor.items()}
    assert ctx.calibration is not None
    calibrator = Calibrator(model, factories)
    calibrator.run(ctx.calibration(), max_batches=max_batches, progress=ctx.progress.enabled)
    return accs


def removal_gram(acc: GramAccumulator, channels: int) -> np.ndarray:
    """``G`` (channels x channels) of one sink, relative to its output energy."""
    sm, h = acc.sm, acc.h
    d = len(sm.owner)
    hx = h[:d, :d]
    if h[d, d] > 0:
        mean = h[:d, d]
        hx = hx - np.outer(mean, mean) / h[d, d]
    m = hx * (sm.wm @ sm.wm.T)
    onehot = np.zeros((d, channels))
    onehot[np.arange(d), sm.owner] = 1.0
    energy = max(float(np.sum(sm.theta * (h @ sm.theta))), 1e-30)
    return onehot.T @ m @ onehot / energy


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


# --- reconstruction ----------------------------------------------------------------------------


@dataclass
class RefitAccumulator:
    """A sink's refit statistics: ``[X' 1]^T [X' 1]``, ``[X' 1]^T Y`` and ``||Y||^2`` at sampled positions.

    ``X'`` is the sink's input in the pruned model, ``Y`` its output in the unpruned model on the
    same batch (:meth:`update`, fed batch by batch, in order, by
    :func:`~onnxcomp.sparsity.dense_collect.collect_pairs`, sharded or not); at most ``max_rows``
    output positions a batch, drawn with ``rng``.
    """

    sm: SinkMatrix
    max_rows: int
    rng: np.random.Generator
    energy: float = 0.0
    hp: np.ndarray | None = None
    ay: np.ndarray | None = None

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """One batch: ``x`` the sink's input in the pruned model, ``y`` its output in the unpruned one."""
        node = self.sm.node
        total = output_count(node, np.shape(y))
        if row_count(node, np.shape(x)) != total:
            raise CalibrationError(
                f"{describe(node)}: input {np.shape(x)} and unpruned output {np.shape(y)} have different positions"
            )
        index = sample_rows(total, self.max_rows, self.rng)
        target = output_rows(node, y, index)
        self.energy += float(np.sum(target * target))
        a = augment(design_rows(node, x, index))
        if self.hp is None or self.ay is None:
            self.hp, self.ay = np.zeros((a.shape[1], a.shape[1])), np.zeros((a.shape[1], target.shape[1]))
        self.hp += a.T @ a
        self.ay += a.T @ target


@dataclass
class RefitResult:
    theta: np.ndarray  # (kept columns + 1 bias row, Cout) in the pruned sink's column order
    error_pruned: float  # relative output error with the channels just removed
    error_refit: float  # relative output error after the refit

    @property
    def wm(self) -> np.ndarray:
        return self.theta[:-1]

    @property
    def bias(self) -> np.ndarray:
        return self.theta[-1]


def refit(acc: RefitAccumulator, keep: np.ndarray, damping: float) -> RefitResult | None:
    """Ridge least-squares refit of the kept columns and the bias; None when it does not help."""
    sm, hp, ay = acc.sm, acc.hp, acc.ay
    if hp is None or ay is None or acc.energy <= 0:
        return None
    cols = np.append(np.flatnonzero(np.isin(sm.owner, keep)), len(sm.owner))
    base = sm.theta[cols]  # the kept rows and the old bias: plain removal
    kept = hp.shape[0] - 1
    a, rhs = hp.copy(), ay.copy()
    if kept:  # ridge towards the plain-removal weights: scarce data keeps them, it never shrinks them to 0
        lam = damping * float(np.mean(np.diag(hp)[:kept])) + 1e-12
        a[np.arange(kept), np.arange(kept)] += lam
        rhs[:kept] += lam * base[:kept]
    try:
        new = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        new = np.linalg.lstsq(a, rhs, rcond=None)[0]

    def error(t: np.ndarray) -> float:
        return max(float(np.sum(t * (hp @ t)) - 2.0 * np.sum(t * ay) + acc.energy), 0.0) / acc.energy

    before, after = error(base), error(new)
    if not (np.isfinite(new).all() and after < before):
        return None
    return RefitResult(new, before, after)


@dataclass
class SinkJob:
    """A sink to refit: its matrix form before pruning and the channels its input keeps."""

    sm: SinkMatrix
    keep: np.ndarray
    out_keep: tuple[np.ndarray, int] | None = None  # when the sink's own outputs were pruned too: (kept, weight axis)


def sink_levels(graph: ir.Graph, sinks: list[ir.Node]) -> list[list[ir.Node]]:
    """Sinks grouped by level: a sink's level is one more than the deepest sink upstream of it."""
    pending = {id(n): n for n in sinks}
    upstream: dict[int, frozenset[int]] = {}
    level: dict[int, int] = {}
    for node in graph.nodes:  # topological order
        above: set[int] = set()
        for tensor in node.inputs:
            prod = ir.producer(tensor)
            if prod is not None:
                above |= upstream.get(id(prod), frozenset())
        if id(node) in pending:
            level[id(node)] = 1 + max((level[u] for u in above), default=-1)
            above.add(id(node))
        upstream[id(node)] = frozenset(above)
    out: list[list[ir.Node]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for key, node in pending.items():
        out[level[key]].append(node)
    return out


def reconstruct_sinks(
    graph: ir.Graph,
    original: onnx.ModelProto,
    jobs: list[SinkJob],
    ctx: PassContext,
    damping: float,
    max_rows: int,
    max_batches: int | None,
) -> dict[int, RefitResult | None]:
    """Refit every job's sink level by level (module docstring); the results by ``id(node)``."""
    if not jobs:
        return {}
    accs = {id(j.sm.node): RefitAccumulator(j.sm, max_rows, ctx.rng(f"prune_channels:{j.sm.node.name}")) for j in jobs}
    assert ctx.calibration is not None
    by_node = {id(j.sm.node): j for j in jobs}
    results: dict[int, RefitResult | None] = {}
    with ctx.progress(len(jobs), "reconstructing") as bar:
        for level in sink_levels(graph, [j.sm.node for j in jobs]):
            ir.finalize(graph)  # the pruned model of this level must be sorted to run
            # one pass: the level's inputs in the pruned model against its outputs in the unpruned one,
            # sharded over --workers / --ray like any calibration (the pair model shipped once per level)
            layers = [(node.inputs[0].name, node.outputs[0].name, accs[id(node)], describe(node)) for node in level]
            collect_pairs(ir.export_model(graph, original), original, layers, ctx.calibration(), max_batches)
            for node in level:
                job = by_node[id(node)]
                results[id(node)] = fit = refit(accs.pop(id(node)), job.keep, damping)
                if fit is not None:
                    _install(graph, job, fit)
                bar.update(1)
    return results


def _install(graph: ir.Graph, job: SinkJob, fit: RefitResult) -> None:
    weight, bias = weight_from_matrix(job.sm, fit.wm, len(job.keep)), fit.bias
    if job.out_keep is not None:
        kept, axis = job.out_keep
        weight, bias = np.take(weight, kept, axis=axis), bias[kept]
    prune_sink(graph, job.sm.sink, job.keep, Refit(weight, bias))
