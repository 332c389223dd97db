"""One calibration session: feed batches to observers, graph inputs from the feeds, the rest from onnxruntime.

:class:`BatchFeeder` is what the in-process calibrator and every sharded worker
(:mod:`onnxcomp.calibration.shard`) run, so a batch is checked, fetched and observed the same way
wherever it runs, and errors name the same 0-based batch index (the worker is told where its
batches start).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from onnxcomp.errors import CalibrationError
from onnxcomp.runtime import ALL_CORES, first_line, ort_session


class SupportsUpdate(Protocol):
    """What the calibrator needs of an observer: ``update(x)`` with each observed array."""

    def update(self, x: np.ndarray, /) -> None: ...


@dataclass(frozen=True)
class FeedPlan:
    """What one pass observes: graph inputs read from the feeds, tensors fetched from the session.

    ``required`` are the model's (non-constant) inputs every batch must carry.
    """

    observed_inputs: tuple[str, ...]
    fetch: tuple[str, ...]
    required: tuple[str, ...]


class BatchFeeder:
    """Runs batches through one onnxruntime session exposing ``plan.fetch`` and updates observers.

    ``model`` is the original model (the fetched tensors are added as outputs here) or the path
    of a model file that already outputs them (what a worker is given).
    """

    def __init__(self, model: onnx.ModelProto | Path, plan: FeedPlan, threads: int = ALL_CORES) -> None:
        self.plan = plan
        self._session = None
        self._feed_names: tuple[str, ...] = plan.required
        if plan.fetch:
            try:
                if isinstance(model, Path):
                    self._session = ort_session(model, level="disable", threads=threads)
                else:
                    # the fetched tensors are appended to the serialisation: no copy of the model
                    self._session = ort_session(model, level="disable", threads=threads, expose=list(plan.fetch))
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
                raise CalibrationError(f"onnxruntime cannot load the calibration model: {first_line(exc)}") from exc
            self._feed_names = tuple(i.name for i in self._session.get_inputs())

    def observe(self, index: int, batch: Any, observers: MutableMapping[str, Any]) -> None:
        """Feed batch ``index`` (0-based in the whole stream) to the observers of this plan."""
        batch = check_and_observe_inputs(self.plan, index, batch, observers)
        if self._session is None:
            return
        feeds = {n: batch[n] for n in self._feed_names if n in batch}
        try:
            values = self._session.run(list(self.plan.fetch), feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise CalibrationError(f"calibration batch {index}: onnxruntime failed: {first_line(exc)}") from exc
        for name, value in zip(self.plan.fetch, values, strict=True):
            update(observers[name], name, value, index)


def check_and_observe_inputs(
    plan: FeedPlan, index: int, batch: Any, observers: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    """Check batch ``index`` carries ``plan.required`` and update the observers of graph inputs.

    Shared by :class:`BatchFeeder` and the partitioned feeder (:mod:`onnxcomp.calibration.blocks`)
    so a bad batch gets the same one-line error whichever way the graph runs. Returns the batch.
    """
    if not isinstance(batch, Mapping):
        raise CalibrationError(
            f"calibration batch {index}: expected a mapping of input name to array, got {type(batch).__name__}"
        )
    missing = [n for n in plan.required if n not in batch]
    if missing:
        raise CalibrationError(
            f"calibration batch {index}: missing model input(s) {', '.join(missing)} (batch has {', '.join(sorted(map(str, batch)))})"
        )
    for name in plan.observed_inputs:
        update(observers[name], name, batch[name], index)
    return batch


def update(observer: SupportsUpdate, name: str, value: np.ndarray, index: int) -> None:
    """``observer.update(value)``, its CalibrationError naming the batch and the tensor."""
    try:
        observer.update(np.asarray(value))
    except CalibrationError as exc:
        raise CalibrationError(f"calibration batch {index}: tensor {name!r}: {exc}") from exc


def observe_chunk(
    feeder: BatchFeeder, first: int, batches: Sequence[Any], observers: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Feed consecutive batches ``first, first + 1, ...`` to ``observers``; returns them (filled)."""
    for offset, batch in enumerate(batches):
        feeder.observe(first + offset, batch, observers)
    return observers
