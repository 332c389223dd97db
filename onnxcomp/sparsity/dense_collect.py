"""A layer's input in the current model against its output in the entry model: one pass, in this process or sharded.

SparseGPT's dense target (:class:`~onnxcomp.sparsity.dense_target.DenseTargetStats`) and channel
pruning's consumer refit (:class:`~onnxcomp.sparsity.reconstruct.RefitAccumulator`) need, on the
same batch, a layer's input ``X_s`` in the model as it is now (earlier layers already sparse or
pruned) and the layer's output ``Y_d`` in the model as it entered the pass. :func:`pair_model`
puts both into ONE model: the current model truncated to what the ``X_s`` tensors need, beside
the entry model truncated to what the ``Y_d`` tensors need (its names prefixed), both reading the
same graph inputs. An ordinary :class:`~onnxcomp.calibration.collect.Calibrator` pass exposes the
tensors (:func:`collect_pairs`), so it shards over ``--workers`` / ``--ray`` like every other
calibration (:mod:`onnxcomp.calibration.shard`): the pair model is written (or put in Ray's
object store) once per call, i.e. once per layer step, and only chunks of batches travel per task.

A layer's two tensors reach its statistics through two observers (:class:`_Slot`, one per
tensor) sharing a :class:`_Pair`, which updates the statistics once both tensors of a batch have
arrived, in either order. Workers run the sessions; the statistics stay in the driver: a worker's
copy of a pair records its chunk's ``(X_s, Y_d)`` (the layer's input and output, not the model's
activations), and the driver feeds them to the statistics as it merges the chunks, in batch order.
The statistics therefore see exactly what one process sees, in the same order: their row
sampling (one generator drawn batch after batch) and float sums are unchanged, and a sharded run
gives the one-process result bit for bit. (Sampling rows per batch index instead, as the Gram
collectors do, would let workers reduce the rows themselves, but it changes the rows one process
samples: on ppocr_cls 2:4 that moved top-1 from 0.954-0.973 of fp32 over five calibration seeds
to 0.940-0.959, below the 0.95 the sparsity tests assert.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import onnx
from onnx.compose import add_prefix

from onnxcomp.calibration.collect import Calibrator
from onnxcomp.calibration.shard import add_note, blank_of, current_resources
from onnxcomp.errors import CalibrationError
from onnxcomp.ir import describe
from onnxcomp.runtime import with_outputs
from onnxcomp.sparsity.dense_target import DenseTargetStats

__all__ = ["PairStats", "collect_dense_target", "collect_pairs", "pair_model"]

_PREFIX = "dense_target/"
_ALL_AT_ONCE = 1 << 62  # the two tensors of a batch must be observed in the same pass (no tensor groups)


def _names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {n.name for n in graph.node}
    return names | {o for n in graph.node for o in n.output}


def pair_model(
    sparse: onnx.ModelProto, dense: onnx.ModelProto, x_names: list[str], y_names: list[str]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """One model computing ``x_names`` of ``sparse`` and ``y_names`` of ``dense``; the dense outputs' names in it.

    Each part is truncated to what its tensors need; the dense part's nodes, tensors and
    initializers get a prefix (its graph inputs keep their names: both parts read the same feeds).
    The pair's graph outputs are the dense tensors (the calibrator exposes ``x_names`` itself).
    """
    pair = with_outputs(sparse, x_names, truncate=True)
    del pair.graph.output[:]
    taken = _names(pair.graph)
    prefix = _PREFIX
    while any(name.startswith(prefix) for name in taken):
        prefix = "_" + prefix
    part = add_prefix(with_outputs(dense, y_names, truncate=True), prefix, rename_inputs=False, rename_functions=False)
    graph = part.graph
    inputs = {i.name for i in pair.graph.input}
    pair.graph.input.extend(i for i in graph.input if i.name not in inputs)
    pair.graph.node.extend(graph.node)
    pair.graph.initializer.extend(graph.initializer)
    pair.graph.sparse_initializer.extend(graph.sparse_initializer)
    pair.graph.value_info.extend(graph.value_info)
    pair.graph.output.extend(graph.output)
    return pair, {name: prefix + name for name in y_names}


class PairStats(Protocol):
    """Statistics of one layer's input in the sparse model against its output in the dense model."""

    def update(self, x: np.ndarray, y: np.ndarray, /) -> None: ...


class _Pair:
    """One layer's ``X_s`` and ``Y_d`` of each batch, added to its statistics once both arrived.

    In the driver (``stats`` set) each complete pair goes straight into the statistics. A
    worker's copy (:meth:`blank`) has no statistics: it keeps the pairs of its chunk, in batch
    order, and the driver feeds them to the statistics when it merges the chunk (chunks are merged
    in batch order). So the statistics see the batches in the order one process sees them, and
    their row sampling (one generator drawn batch after batch) and float sums are the same.
    """

    def __init__(self, stats: PairStats | None, label: str) -> None:
        self.stats = stats
        self.label = label
        self.pending: dict[str, np.ndarray] = {}
        self.recorded: list[tuple[np.ndarray, np.ndarray]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "stats": None}  # the statistics stay in the driver (they hold the layer's node)

    def put(self, role: str, value: np.ndarray) -> None:
        self.pending[role] = value
        if len(self.pending) == 2:
            x, y = self.pending["x"], self.pending["y"]
            self.pending = {}
            if self.stats is None:
                self.recorded.append((x, y))
            else:
                self.stats.update(x, y)

    def blank(self, memo: dict[int, Any]) -> _Pair:
        return _Pair(None, self.label)

    def absorb(self, other: _Pair) -> None:
        """Feed a worker's recorded pairs (one chunk, in batch order) to these statistics."""
        if other.pending:
            raise CalibrationError(
                f"{self.label}: a worker saw only one of the layer's input and dense output of a batch"
            )
        if self.stats is None:
            raise CalibrationError(f"{self.label}: a worker's copy cannot take another worker's pairs")
        for x, y in other.recorded:
            self.stats.update(x, y)


class _Slot:
    """The calibrator's observer of one tensor: the ``role`` ("x" or "y") of every :class:`_Pair` reading it."""

    mergeable = True

    def __init__(self, pairs: list[_Pair], role: str) -> None:
        self.pairs = pairs
        self.role = role

    def update(self, value: np.ndarray) -> None:
        for pair in self.pairs:
            pair.put(self.role, value)

    def blank(self, memo: dict[int, Any]) -> _Slot:
        return _Slot([blank_of(pair, memo) for pair in self.pairs], self.role)

    def merge(self, other: _Slot) -> None:
        if self.role != "y":  # each pair once (a layer has one output), not once per slot
            return
        for mine, theirs in zip(self.pairs, other.pairs, strict=True):
            mine.absorb(theirs)


def _returning(slot: _Slot) -> Callable[[], _Slot]:
    """The calibrator's factory of ``slot``: the caller's own object (workers get blank copies)."""
    return lambda: slot


def collect_pairs(
    sparse: onnx.ModelProto,
    dense: onnx.ModelProto,
    layers: Sequence[tuple[str, str, PairStats, str]],
    batches: Iterable[Mapping[str, np.ndarray]],
    max_batches: int | None = None,
    progress: bool = False,
) -> None:
    """Fill each ``(x_name, y_name, stats, label)``: ``x_name`` of ``sparse`` against ``y_name`` of ``dense``, batch by batch.

    One pass over the data on the run's calibration resources (sharded with ``--workers`` /
    ``--ray``); the tensors are always exposed in the same pass (no tensor groups, no graph
    partitions: each pair is updated per batch). The layers' outputs must differ. Raises
    CalibrationError on empty data or a failing batch.
    """
    x_names = list(dict.fromkeys(x for x, _, _, _ in layers))
    y_names = [y for _, y, _, _ in layers]
    if len(set(y_names)) != len(y_names):
        raise CalibrationError("collect_pairs: two layers with the same output")
    pair_proto, renamed = pair_model(sparse, dense, x_names, y_names)
    pairs = [_Pair(stats, label) for _, _, stats, label in layers]
    slots = {x: _Slot([p for p, (xn, *_) in zip(pairs, layers, strict=True) if xn == x], "x") for x in x_names}
    slots.update({renamed[y]: _Slot([p], "y") for p, (_, y, *_) in zip(pairs, layers, strict=True)})
    calibrator = Calibrator(pair_proto, {name: _returning(slot) for name, slot in slots.items()})
    del pair_proto
    run = current_resources()
    resources = dataclasses.replace(run, memory=_ALL_AT_ONCE, partitions=1)
    calibrator.run(batches, max_batches=max_batches, progress=progress, resources=resources)
    if run.partitions > 1:
        add_note("the sparse-model vs dense-model statistics ran all at once, not in partitions (pairs per batch)")
    for pair in pairs:
        if pair.pending:
            raise CalibrationError(f"{pair.label}: a batch gave only one of the layer's input and dense output")


def collect_dense_target(
    sparse: onnx.ModelProto,
    dense: onnx.ModelProto,
    x_name: str,
    y_name: str,
    stats: DenseTargetStats,
    batches: Iterable[Mapping[str, np.ndarray]],
    max_batches: int | None = None,
    progress: bool = False,
) -> DenseTargetStats:
    """Fill ``stats`` of one layer (:func:`collect_pairs`); returns it."""
    collect_pairs(sparse, dense, [(x_name, y_name, stats, describe(stats.node))], batches, max_batches, progress)
    return stats
