"""Streaming activation calibration: one onnxruntime session, one observer per tensor.

The model copy gets every requested intermediate tensor as an extra graph output
(:func:`onnxcomp.runtime.with_outputs`) and runs with ``ORT_DISABLE_ALL`` so intermediate names
survive. Each batch's outputs are fed to their
observers and dropped at once, so memory is one batch's activations plus the observers' fixed
state, whatever the number of batches. This is the fix for onnxruntime's calibrators, which keep
every intermediate output of every batch (microsoft/onnxruntime#10503, #11020, #21979).
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Generic, Protocol, TypeVar

import numpy as np
import onnx

from onnxcomp.errors import CalibrationError, ConfigError
from onnxcomp.progress import progress_bar
from onnxcomp.runtime import ALL_CORES, first_line, ort_session, with_outputs


class SupportsUpdate(Protocol):
    """What the calibrator needs of an observer: ``update(x)`` with each observed array."""

    def update(self, x: np.ndarray, /) -> None: ...


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
        self._inputs: tuple[str, ...] = tuple(n for n in self.tensors if n in inputs)
        self._required: tuple[str, ...] = tuple(inputs)
        self._fetch: list[str] = [n for n in self.tensors if n not in self._inputs]
        #: number of batches consumed by the last :meth:`run`
        self.batches_seen = 0
        self._session = None
        self._feed_names: tuple[str, ...] = tuple(inputs)
        if self._fetch:
            augmented = with_outputs(model, self._fetch)
            try:
                self._session = ort_session(augmented, level="disable", threads=ALL_CORES)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
                raise CalibrationError(f"onnxruntime cannot load the calibration model: {first_line(exc)}") from exc
            del augmented  # only the session is kept (a >= 2 GB model is not held twice)
            self._feed_names = tuple(i.name for i in self._session.get_inputs())

    def run(
        self,
        batches: Iterable[Mapping[str, np.ndarray]],
        max_batches: int | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> dict[str, ObserverT]:
        """Stream ``batches`` (at most ``max_batches``) through the session; the filled observers.

        A batch maps input names to arrays; keys that are not model inputs are ignored (labels,
        ids). Raises CalibrationError on empty data, a missing input, an onnxruntime failure, or a
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
        observers = {name: factory() for name, factory in self._factories.items()}
        stream = iter(batches) if max_batches is None else itertools.islice(batches, max_batches)
        self.batches_seen = 0
        with progress_bar(total, "calibrating", enabled=progress) as bar:
            for index, batch in enumerate(stream):
                self._observe(index, batch, observers)
                self.batches_seen += 1
                bar.update(1)
        if self.batches_seen == 0:
            raise CalibrationError("calibration data is empty")
        return observers

    def _observe(self, index: int, batch: Mapping[str, np.ndarray], observers: dict[str, ObserverT]) -> None:
        if not isinstance(batch, Mapping):
            raise CalibrationError(
                f"calibration batch {index}: expected a mapping of input name to array, got {type(batch).__name__}"
            )
        missing = [n for n in self._required if n not in batch]
        if missing:
            raise CalibrationError(
                f"calibration batch {index}: missing model input(s) {', '.join(missing)} (batch has {', '.join(sorted(map(str, batch)))})"
            )
        for name in self._inputs:
            self._update(observers[name], name, batch[name], index)
        if self._session is None:
            return
        feeds = {n: batch[n] for n in self._feed_names if n in batch}
        try:
            values = self._session.run(self._fetch, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise CalibrationError(f"calibration batch {index}: onnxruntime failed: {first_line(exc)}") from exc
        for name, value in zip(self._fetch, values, strict=True):
            self._update(observers[name], name, value, index)

    @staticmethod
    def _update(observer: SupportsUpdate, name: str, value: np.ndarray, index: int) -> None:
        try:
            observer.update(np.asarray(value))
        except CalibrationError as exc:
            raise CalibrationError(f"calibration batch {index}: tensor {name!r}: {exc}") from exc


class Tee:
    """Feeds one tensor to several collectors (one per purpose), in a fixed order."""

    def __init__(self, collectors: Mapping[str, SupportsUpdate]) -> None:
        self.collectors = dict(collectors)

    def update(self, x: np.ndarray) -> None:
        for collector in self.collectors.values():
            collector.update(x)


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
