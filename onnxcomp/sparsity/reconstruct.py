"""Data-driven channel choice and least-squares reconstruction of consumers on calibration data.

A sink computes ``y = [X 1] theta`` with ``theta = [Wm; b]`` (:mod:`onnxcomp.sparsity.gram`).

* **Selection** (criterion ``data``), on the unpruned model: removing channel set S without
  refitting costs ``1_S^T G 1_S``, ``G[c, d]`` = the sum of ``Hc o (Wm Wm^T)`` over the columns of
  channels c and d (``Hc`` = ``X^T X``, centred when the bias can absorb each channel's mean). ``G``
  is summed over the group's sinks, each relative to its output energy ``tr(theta^T H theta)``,
  and S is grown greedily (ThiNet).
* **Reconstruction**, sequential: after the channels are removed, the sinks are refit level by
  level in graph order (a sink's level is one more than that of any sink upstream of it). For
  each level one calibration pass runs the original and the *pruned* model on the same batches,
  giving ``Hp = [X' 1]^T [X' 1]`` and ``cross = [X' 1]^T [X 1]``, where ``X'`` is what the sink
  now sees (its kept channels, already carrying the upstream pruning and refits) and ``X`` what
  it saw before. The ridge least-squares refit ``t = (Hp + lambda I)^-1 cross theta`` makes the
  sink's output match the unpruned model's as closely as possible; the bias is refit too when the
  sink can hold one. A refit that does not lower the error (it always should) is dropped.

Errors are reported relative to the sink's output energy on the calibration data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxcomp import ir
from onnxcomp.errors import CalibrationError
from onnxcomp.model_io import ort_session
from onnxcomp.pipeline import PassContext
from onnxcomp.quant.calibrator import Calibrator
from onnxcomp.sparsity.gram import Fanout, GramAccumulator, SinkMatrix, weight_from_matrix
from onnxcomp.sparsity.rewrite import Refit, prune_sink


@dataclass
class RefitResult:
    theta: np.ndarray  # (kept columns [+ 1 bias row], Cout) in the pruned sink's column order
    bias: np.ndarray | None  # refit bias (None: the bias is left as it is)
    error_pruned: float  # relative output error with the channels just removed
    error_refit: float  # relative output error after the refit

    @property
    def wm(self) -> np.ndarray:
        return self.theta[:-1]


def accumulators(matrices: list[SinkMatrix], ctx: PassContext, max_rows: int) -> dict[int, GramAccumulator]:
    """A fresh accumulator per sink (keyed by ``id(node)``), each with its own seeded generator."""
    return {id(sm.node): GramAccumulator(sm, max_rows, ctx.rng(f"prune_channels:{sm.node.name}")) for sm in matrices}


def collect(model: onnx.ModelProto, accs: dict[int, GramAccumulator], ctx: PassContext, max_batches: int | None) -> None:
    """One calibration pass over ``model`` filling ``H`` of every accumulator."""
    by_tensor: dict[str, list[GramAccumulator]] = {}
    for acc in accs.values():
        by_tensor.setdefault(acc.sm.node.inputs[0].name, []).append(acc)
    factories = {name: (lambda group=group: Fanout(group)) for name, group in by_tensor.items()}
    assert ctx.calibration is not None
    Calibrator(model, factories).run(ctx.calibration(), max_batches=max_batches, progress=ctx.progress.enabled)  # type: ignore[arg-type]


class TensorRunner:
    """One onnxruntime session of a model exposing intermediate tensors as outputs."""

    def __init__(self, model: onnx.ModelProto, names: list[str]) -> None:
        augmented = onnx.ModelProto()
        augmented.CopyFrom(model)
        existing = {o.name for o in augmented.graph.output}
        augmented.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in existing)
        self.session = ort_session(augmented, level="disable")
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, batch: Mapping[str, np.ndarray], names: list[str], index: int) -> list[np.ndarray]:
        try:
            return self.session.run(names, {n: batch[n] for n in self.inputs})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise CalibrationError(f"calibration batch {index}: onnxruntime failed: {first}") from exc


def paired_batches(
    original: TensorRunner, pruned: TensorRunner, names: list[str], ctx: PassContext, max_batches: int | None
) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    """``names`` in the original and the pruned model, batch by batch (same calibration batches)."""
    assert ctx.calibration is not None
    for index, batch in enumerate(ctx.calibration()):
        if max_batches is not None and index >= max_batches:
            return
        yield original.run(batch, names, index), pruned.run(batch, names, index)


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


def _energy(acc: GramAccumulator) -> float:
    theta = acc.sm.theta
    return max(float(np.sum(theta * (acc.h @ theta))), 1e-30)


def relative_error(acc: GramAccumulator, theta: np.ndarray) -> float:
    """Output error of full-width parameters ``theta`` on the unpruned input, relative to the energy."""
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
    """Ridge least-squares refit of the kept columns (and the bias); None when it does not help.

    Uses the paired statistics when the accumulator has them, else the unpruned ``H`` restricted
    to the kept columns (the sink's input is then the original one minus the removed channels).
    """
    sm, h = acc.sm, acc.h
    d = len(sm.owner)
    theta = sm.theta
    cols = np.append(np.flatnonzero(np.isin(sm.owner, keep)), d)
    hp, cross = (acc.hp, acc.cross) if acc.hp is not None and acc.cross is not None else (h[np.ix_(cols, cols)], h[cols])
    kept = hp.shape[0] - 1
    base = theta[cols]  # the kept rows and the old bias: plain removal
    idx = np.arange(kept + 1) if sm.intercept else np.arange(kept)
    a = hp[np.ix_(idx, idx)].copy()
    if kept:
        a[np.arange(kept), np.arange(kept)] += damping * float(np.mean(np.diag(a)[:kept])) + 1e-12
    rhs = cross[idx] @ theta if sm.intercept else cross[idx] @ theta - np.outer(hp[idx, kept], theta[d])
    try:
        sol = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
    new = base.copy()
    new[idx] = sol
    energy = _energy(acc)

    def error(t: np.ndarray) -> float:
        value = np.sum(t * (hp @ t)) - 2.0 * np.sum(t * (cross @ theta)) + np.sum(theta * (h @ theta))
        return max(float(value), 0.0) / energy

    before, after = error(base), error(new)
    if not (np.isfinite(sol).all() and after < before):
        return None
    return RefitResult(new, new[-1] if sm.intercept else None, before, after)


@dataclass
class SinkJob:
    """A sink to refit: its matrix form before pruning and the channels its input keeps."""

    sm: SinkMatrix
    keep: np.ndarray
    out_keep: tuple[np.ndarray, int] | None = None  # when the sink's own outputs were pruned too: (kept, weight axis)


def reconstruct_sinks(
    graph: ir.Graph, template: onnx.ModelProto, original: onnx.ModelProto, jobs: list[SinkJob], ctx: PassContext,
    damping: float, max_rows: int, max_batches: int | None,
) -> dict[int, RefitResult | None]:
    """Refit every job's sink level by level (module docstring); the refits by ``id(node)``."""
    by_node = {id(job.sm.node): job for job in jobs}
    runner = TensorRunner(original, [job.sm.node.inputs[0].name for job in jobs])
    results: dict[int, RefitResult | None] = {}
    for level in sink_levels(graph, [job.sm.node for job in jobs]):
        ir.finalize(graph)  # the pruned model of this level must be sorted to run
        names = list(dict.fromkeys(node.inputs[0].name for node in level))
        pruned = TensorRunner(ir.export_model(graph, template), names)
        accs = accumulators([by_node[id(node)].sm for node in level], ctx, max_rows)
        for xs, xps in paired_batches(runner, pruned, names, ctx, max_batches):
            values = dict(zip(names, zip(xs, xps, strict=True), strict=True))
            for acc in accs.values():
                acc.update(*values[acc.sm.node.inputs[0].name])
        for node in level:
            job = by_node[id(node)]
            fit = refit(accs[id(node)], job.keep, damping)
            results[id(node)] = fit
            if fit is None:
                continue
            weight, bias = weight_from_matrix(job.sm, fit.wm, len(job.keep)), fit.bias
            if job.out_keep is not None:
                kept, axis = job.out_keep
                weight = np.take(weight, kept, axis=axis)
                bias = None if bias is None else bias[kept]
            prune_sink(graph, job.sm.sink, job.keep, Refit(weight, bias))
    return results
