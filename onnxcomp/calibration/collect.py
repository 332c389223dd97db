"""Streaming activation calibration: one onnxruntime session, one observer per tensor.

The model copy gets every requested intermediate tensor as an extra graph output
(:func:`onnxcomp.runtime.with_outputs`) and runs with ``ORT_DISABLE_ALL`` so intermediate names
survive. Each batch's outputs are fed to their
observers and dropped at once, so memory is one batch's activations plus the observers' fixed
state, whatever the number of batches. This is the fix for onnxruntime's calibrators, which keep
every intermediate output of every batch (microsoft/onnxruntime#10503, #11020, #21979).

The run's :class:`~onnxcomp.calibration.shard.CalibrationResources` decide the rest
(``docs/scale.md``): batches sharded over worker processes or Ray actors and merged in a fixed
order (:mod:`onnxcomp.calibration.shard`), and the tensors exposed in groups, one pass over the
data per group, when all of them would exceed the memory budget
(:mod:`onnxcomp.calibration.partition`). Neither changes the result of exactly mergeable
observers.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, Generic, TypeVar

import numpy as np
import onnx

from onnxcomp.errors import CalibrationError, ConfigError
from onnxcomp.progress import progress_bar

from .blocks import PartitionedFeeder, why_not_partitioned
from .partition import Spool, estimate_bytes, group_tensors, machine_budget
from .session import BatchFeeder, FeedPlan, SupportsUpdate
from .shard import (
    CalibrationResources,
    add_note,
    blank_of,
    can_merge,
    current_resources,
    run_sharded,
    seek,
    why_not_shardable,
)

__all__ = ["Calibrator", "SupportsUpdate", "Tee", "collect_many"]

ObserverT = TypeVar("ObserverT", bound=SupportsUpdate)


class Calibrator(Generic[ObserverT]):
    """Collect activation statistics of ``tensors`` over a stream of calibration batches.

    ``tensors`` maps a tensor name (a graph input or any node output of the main graph) to an
    observer factory (an observer is anything with ``update(x)``); each :meth:`run` makes fresh
    observers. Graph inputs are observed from the feeds directly. Unknown names, and initializers
    (weights are observed from the constants, not here), raise :class:`CalibrationError`.
    """

    def __init__(self, model: onnx.ModelProto, tensors: Mapping[str, Callable[[], ObserverT]]) -> None:
        graph = model.graph
        constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
        inputs = [i.name for i in graph.input if i.name not in constants]
        outputs = [o.name for o in graph.output]
        produced = {name for node in graph.node for name in node.output if name}
        known = set(inputs) | produced | set(outputs)
        for name in tensors:
            if name in constants:
                raise CalibrationError(
                    f"tensor {name!r} is an initializer (a constant); it has no activation range to calibrate"
                )
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise CalibrationError(f"tensor {name!r} is not a graph input or a node output of the model{hint}")
        self.tensors: tuple[str, ...] = tuple(tensors)
        self._factories: dict[str, Callable[[], ObserverT]] = dict(tensors)
        observed_inputs = tuple(n for n in self.tensors if n in inputs)
        fetch = tuple(n for n in self.tensors if n not in observed_inputs)
        self._model = model
        self._plan = FeedPlan(observed_inputs, fetch, tuple(inputs))
        #: number of batches consumed by the last :meth:`run`
        self.batches_seen = 0
        self._parts = 1  # partitions of the graph in the current run (calibration.blocks)
        #: how the last :meth:`run` ran: tensor groups, workers, or why it stayed in this process
        self.notes: list[str] = []
        # In one process the session is made now, as it always was (load errors surface here).
        self._feeder: BatchFeeder | None = None if current_resources().sharded else BatchFeeder(model, self._plan)

    def run(
        self,
        batches: Iterable[Mapping[str, np.ndarray]],
        max_batches: int | None = None,
        progress: bool = False,
        total: int | None = None,
        resources: CalibrationResources | None = None,
    ) -> dict[str, ObserverT]:
        """Stream ``batches`` (at most ``max_batches``) through the session; the filled observers.

        A batch maps input names to arrays; keys that are not model inputs are ignored (labels,
        ids). ``resources`` (default: the run's, :func:`~onnxcomp.calibration.shard.current_resources`)
        may shard the batches over workers and split the tensors into groups; the result is the
        same. Raises CalibrationError on empty data, a missing input, an onnxruntime failure, or a
        non-finite observed value (naming the tensor and the 0-based batch index).
        """
        if max_batches is not None and (
            isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
        ):
            raise ConfigError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        if total is None:
            total = len(batches) if isinstance(batches, Sized) else None
            if max_batches is not None:
                total = max_batches if total is None else min(total, max_batches)
        resources = resources if resources is not None else current_resources()
        self.notes = []
        self._parts = 1
        if resources.partitions > 1:
            reason = why_not_partitioned(self._model, resources.partitions)
            if resources.sharded:
                reason = "the batches are sharded over workers, each running the whole graph"
            if reason is None:
                self._parts = resources.partitions
                self._feeder = None  # each partition gets a session of its own
                self.notes.append(f"the graph ran in {resources.partitions} partitions, one session each")
            else:
                self.notes.append(f"the graph ran all at once, not in {resources.partitions} partitions: {reason}")

        def stream_of(source: Iterable[Any]) -> Iterator[Any]:
            return iter(source) if max_batches is None else itertools.islice(source, max_batches)

        stream = stream_of(batches)
        first = next(stream, None)
        if first is None:
            self.batches_seen = 0
            raise CalibrationError("calibration data is empty")
        stream = itertools.chain([first], stream)
        groups = self._groups(first, resources)
        observers: dict[str, ObserverT] = {name: factory() for name, factory in self._factories.items()}
        reason = why_not_shardable(observers) if resources.sharded else None
        if reason is not None:
            self.notes.append(f"calibrated in this process: {reason}")
        shard = resources if resources.sharded and reason is None else None
        rerun = iter(batches) is not batches  # a list or another re-iterable: read again per group
        spool = Spool(stream) if len(groups) > 1 and not rerun else None
        try:
            with progress_bar(None if total is None else total * len(groups), "calibrating", enabled=progress) as bar:
                for index, group in enumerate(groups):
                    if index == 0:
                        source: Iterator[Any] = spool.record() if spool is not None else stream
                    else:
                        source = spool.replay() if spool is not None else stream_of(batches)
                    plan = FeedPlan(self._plan.observed_inputs if index == 0 else (), group, self._plan.required)
                    seen = self._pass(plan, source, observers, shard, total, bar.update)
                    self.batches_seen = seen if index == 0 else self.batches_seen
        finally:
            if spool is not None:
                spool.close()
        if shard is not None:
            where = f"the Ray cluster at {shard.ray}" if shard.ray is not None else f"{shard.workers} worker processes"
            self.notes.append(f"calibration sharded over {where}")
        for note in self.notes:
            add_note(note)
        return observers

    def _groups(self, first: Any, resources: CalibrationResources) -> list[tuple[str, ...]]:
        """The fetched tensors in groups that fit the memory budget (one group: all at once)."""
        fetch = self._plan.fetch
        if len(fetch) < 2 or not isinstance(first, Mapping):
            return [fetch]
        budget = resources.memory if resources.memory is not None else machine_budget()
        sizes = estimate_bytes(self._model, fetch, first)
        if all(size is None for size in sizes.values()):  # nothing to go by: groups of one would be a guess
            if resources.memory is not None:
                self.notes.append("no tensor size could be inferred: every tensor exposed at once, whatever the budget")
            return [fetch]
        groups = group_tensors(fetch, sizes, budget)
        if len(groups) > 1:
            self._feeder = None  # each group gets a session of its own; release the all-at-once one
            known = sum(s for s in sizes.values() if s is not None)
            self.notes.append(
                f"{len(fetch)} tensors (~{known / 2**20:.1f} MiB per batch) exceed the calibration memory budget of "
                f"{budget / 2**20:.1f} MiB: calibrated in {len(groups)} groups, one pass over the data each"
            )
        return groups

    def _pass(
        self,
        plan: FeedPlan,
        source: Iterator[Any],
        observers: dict[str, ObserverT],
        shard: CalibrationResources | None,
        total: int | None,
        advance: Callable[[int], None],
    ) -> int:
        """One pass over the data observing ``plan``'s tensors; the number of batches read."""
        if shard is not None:
            # merged into these very objects: a fan-out's accumulators are the caller's
            into = {name: observers[name] for name in (*plan.observed_inputs, *plan.fetch)}
            return run_sharded(self._model, plan, into, source, shard, total, advance)
        feeder: BatchFeeder | PartitionedFeeder | None = None
        if self._parts > 1 and plan.fetch:
            feeder = PartitionedFeeder(self._model, plan, self._parts)
        elif self._feeder is not None and plan.fetch == self._plan.fetch:
            feeder = self._feeder
        if feeder is None:
            feeder = BatchFeeder(self._model, plan)
        seen = 0
        for index, batch in enumerate(source):
            feeder.observe(index, batch, observers)
            seen += 1
            advance(1)
        return seen


class Tee:
    """Feeds one tensor to several collectors (one per purpose), in a fixed order."""

    def __init__(self, collectors: Mapping[str, SupportsUpdate]) -> None:
        self.collectors = dict(collectors)

    def update(self, x: np.ndarray) -> None:
        for collector in self.collectors.values():
            collector.update(x)

    @property
    def mergeable(self) -> bool:
        """Whether every collector merges (then the Tee can be filled in shards)."""
        return all(can_merge(c) for c in self.collectors.values())

    def blank(self, memo: dict[int, Any]) -> Tee:
        """The Tee a worker fills: empty copies of collectors that write into the caller's objects."""
        return Tee({purpose: blank_of(c, memo) for purpose, c in self.collectors.items()})

    def seek(self, index: int) -> None:
        for collector in self.collectors.values():
            seek(collector, index)

    def merge(self, other: Tee) -> None:
        """Merge each purpose's collector with ``other``'s (same purposes, same order)."""
        if list(other.collectors) != list(self.collectors):
            raise CalibrationError(f"cannot merge collectors of {list(other.collectors)} into {list(self.collectors)}")
        for purpose, collector in self.collectors.items():
            merge: Callable[[Any], None] = collector.merge  # type: ignore[attr-defined]  # mergeable says so
            merge(other.collectors[purpose])


def collect_many(
    model: onnx.ModelProto,
    wanted: Mapping[str, Mapping[str, Callable[[], SupportsUpdate]]],
    batches: Iterable[Mapping[str, np.ndarray]],
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, dict[str, SupportsUpdate]]:
    """Several statistics in ONE calibration pass: ``{purpose: {tensor: factory}}`` -> filled collectors.

    Purposes that watch the same tensor (activation ranges, channel means, Gram matrices) share
    its one fetch per batch, so adding an algorithm's statistics costs no extra pass.
    """
    by_tensor: dict[str, dict[str, Callable[[], SupportsUpdate]]] = {}
    for purpose, tensors in wanted.items():
        for tensor, factory in tensors.items():
            by_tensor.setdefault(tensor, {})[purpose] = factory
    if not by_tensor:
        return {purpose: {} for purpose in wanted}
    factories = {
        tensor: (lambda group=group: Tee({p: f() for p, f in group.items()})) for tensor, group in by_tensor.items()
    }
    tees = Calibrator(model, factories).run(batches, max_batches=max_batches, progress=progress)
    filled: dict[str, dict[str, SupportsUpdate]] = {purpose: {} for purpose in wanted}
    for tensor, tee in tees.items():
        for purpose, collector in tee.collectors.items():
            filled[purpose][tensor] = collector
    return filled
