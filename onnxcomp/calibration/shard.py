"""Calibration sharded over worker processes (standard library) or Ray actors, merged in a fixed order.

The stream of batches is cut into *chunks* of consecutive batches (the chunk size depends only on
the number of batches and workers). Each chunk goes to a worker, which feeds it through its own
onnxruntime session (:class:`onnxcomp.calibration.session.BatchFeeder`) into fresh copies of the
observers and returns their states; the driver merges the states chunk by chunk, in chunk order,
into the driver's observers. So the result does not depend on which worker finished first:
observers whose merge is exact (min/max, histograms, ChannelStats) give the single-process result
bit for bit, float sums (ChannelMean, Gram matrices) the same up to the order of the additions.

Collectors that write into accumulators the caller keeps (a
:class:`~onnxcomp.calibration.gram.Fanout` to the ``X^T X`` of GPTQ, SparseGPT and channel
pruning) shard too: a task gets empty copies (:func:`blank_of`), told by :func:`seek` where its
batches start (row sampling is seeded per batch index), and the driver merges the results into
the caller's own objects.

The model is shipped to each worker once: written to a temporary file that every local worker
opens in its initializer, or put once in Ray's object store (a node need not share our disk) and
opened by each actor when it starts. Only the chunks travel per task, and at most two chunks per
worker are in flight, so the driver holds a bounded number of batches.

Which resources calibration may use is set for a whole run with :func:`calibration_resources`
(``execute.run_plan`` does, from ``--workers`` / ``--ray`` / ``--calib-memory``); the calibrator reads it
with :func:`current_resources`, so every pass that calibrates is sharded without knowing it.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import pickle
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import onnx

from onnxcomp.blas import limit_blas_threads
from onnxcomp.errors import CalibrationError, ConfigError, OnnxCompError
from onnxcomp.runtime import PROTOBUF_LIMIT, first_line, with_outputs, write_model_file

from .session import BatchFeeder, FeedPlan, observe_chunk

_MAX_CHUNK = 8  # batches per task at most: bounds what the driver holds, keeps workers balanced
_IN_FLIGHT = 2  # chunks queued per worker: one running, one ready
_RAY_HINT = "install it with: pip install 'onnxcomp[distributed]' (or pip install ray)"


@dataclass(frozen=True)
class CalibrationResources:
    """Where calibration runs and how much it may expose at once.

    ``workers``: local worker processes (1 = in this process); with ``ray``, the number of Ray
    actors (1 = one per CPU of the cluster). ``ray``: a Ray address (``auto`` = the running
    cluster) or None. ``memory``: bytes the tensors exposed for one batch may take (None: a
    quarter of the machine's memory, see :mod:`onnxcomp.calibration.partition`). ``partitions``:
    run the graph in that many consecutive blocks of nodes, one session each, so a batch's live
    tensors are about one block's (:mod:`onnxcomp.calibration.blocks`; in this process only).
    """

    workers: int = 1
    ray: str | None = None
    memory: int | None = None
    partitions: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be a positive integer, got {self.workers!r}")
        if self.ray is not None and (not isinstance(self.ray, str) or not self.ray.strip()):
            raise ConfigError(f"ray must be a cluster address such as 'auto', got {self.ray!r}")
        if self.memory is not None and (
            isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1
        ):
            raise ConfigError(f"the calibration memory budget must be a positive number of bytes, got {self.memory!r}")
        if isinstance(self.partitions, bool) or not isinstance(self.partitions, int) or self.partitions < 1:
            raise ConfigError(f"partitions must be a positive integer, got {self.partitions!r}")

    @property
    def sharded(self) -> bool:
        return self.workers > 1 or self.ray is not None


_CURRENT: ContextVar[tuple[CalibrationResources, list[str]] | None] = ContextVar("calibration_resources", default=None)


@contextlib.contextmanager
def calibration_resources(resources: CalibrationResources) -> Iterator[list[str]]:
    """Every calibration inside the ``with`` block uses ``resources``; yields the notes they make.

    The notes say how each calibration ran (on which workers, in how many groups, or why it stayed
    in this process), once each, in order: ``execute.run_plan`` adds them to the run report.
    """
    notes: list[str] = []
    token = _CURRENT.set((resources, notes))
    try:
        yield notes
    finally:
        _CURRENT.reset(token)


def current_resources() -> CalibrationResources:
    """The resources set by the innermost :func:`calibration_resources` (default: one process)."""
    current = _CURRENT.get()
    return current[0] if current is not None else CalibrationResources()


def add_note(note: str) -> None:
    """Tell the run how a calibration ran (kept once; dropped outside :func:`calibration_resources`)."""
    current = _CURRENT.get()
    if current is not None and note not in current[1]:
        current[1].append(note)


def can_merge(observer: Any) -> bool:
    """Whether ``observer`` says it merges (``mergeable``, else a ``merge`` method)."""
    flag = getattr(observer, "mergeable", None)
    return bool(flag) if flag is not None else callable(getattr(observer, "merge", None))


def blank_of(observer: Any, memo: dict[int, Any]) -> Any:
    """What a worker fills for ``observer``: an empty copy (its ``blank(memo)``), else ``observer`` itself.

    An observer a factory made fresh needs no copy. Collectors that write into accumulators the
    caller keeps (:class:`~onnxcomp.calibration.gram.Fanout`) return copies of them; ``memo``
    (one per task, by ``id``) makes an accumulator shared by several tensors one shared copy.
    """
    blank = getattr(observer, "blank", None)
    if not callable(blank):
        return observer
    key = id(observer)
    if key not in memo:
        memo[key] = blank(memo)
    return memo[key]


def shardable(accumulator: Any) -> bool:
    """Whether an accumulator the caller keeps can be filled in workers: it merges and has ``blank``."""
    return can_merge(accumulator) and callable(getattr(accumulator, "blank", None))


def seek(observer: Any, index: int) -> None:
    """Tell ``observer`` (if it asks, by a ``seek`` method) that its next batch is batch ``index``.

    Collectors that sample rows per batch seed the sampling by the batch's index in the whole
    stream, so a worker's chunk must say where it starts.
    """
    method = getattr(observer, "seek", None)
    if callable(method):
        method(index)


def why_not_shardable(templates: Mapping[str, Any]) -> str | None:
    """Why these observers cannot be filled in workers and merged, or None if they can.

    An observer must say it merges (:func:`can_merge`) and pickle.
    """
    for name, observer in templates.items():
        if not can_merge(observer):
            return f"the collector of tensor {name!r} ({type(observer).__name__}) cannot merge partial results"
        try:
            pickle.dumps(observer)
        except Exception as exc:  # noqa: BLE001 - pickling raises several unrelated types
            return f"the collector of tensor {name!r} ({type(observer).__name__}) cannot be sent to a worker: {first_line(exc)}"
    return None


def chunk_size(total: int | None, workers: int) -> int:
    """Batches per task: the batches spread evenly over the workers, at most ``_MAX_CHUNK``."""
    if total is None:
        return _MAX_CHUNK // 2
    return max(1, min(_MAX_CHUNK, math.ceil(total / workers)))


def _chunks(stream: Iterator[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    first, chunk = 0, []
    for batch in stream:
        chunk.append(dict(batch) if isinstance(batch, Mapping) else batch)  # a plain dict pickles
        if len(chunk) == size:
            yield first, chunk
            first, chunk = first + size, []
    if chunk:
        yield first, chunk


# --- workers ------------------------------------------------------------------------------------

_LOCAL: BatchFeeder | None = None  # a local worker process's feeder, made once by its initializer
_LOCAL_ERROR: OnnxCompError | None = None  # why it could not be made


def _start_local(path: str, plan: FeedPlan, threads: int) -> None:
    global _LOCAL, _LOCAL_ERROR
    limit_blas_threads(threads)  # the Gram products of a worker share the cores like its session
    try:
        _LOCAL = BatchFeeder(Path(path), plan, threads)
    except OnnxCompError as exc:  # raised by the first task: an initializer's error would only break the pool
        _LOCAL_ERROR = exc


def _observe(feeder: BatchFeeder, first: int, batches: list[Any], observers: MutableMapping[str, Any]) -> Any:
    for observer in observers.values():
        seek(observer, first)
    return observe_chunk(feeder, first, batches, observers)


def _local_task(first: int, batches: list[Any], observers: dict[str, Any]) -> MutableMapping[str, Any]:
    if _LOCAL_ERROR is not None:
        raise _LOCAL_ERROR
    assert _LOCAL is not None, "the worker initializer did not run"
    return _observe(_LOCAL, first, batches, observers)


def _local_result(future: Future[MutableMapping[str, Any]]) -> MutableMapping[str, Any]:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise CalibrationError(
            f"a calibration worker process died ({first_line(exc)}); out of memory? try fewer --workers"
        ) from exc


class RayWorker:
    """A Ray actor's state: the model files written to a private directory, one session over them."""

    def __init__(self, files: dict[str, bytes], plan: FeedPlan, threads: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="onnxcomp-ray-")
        for name, data in files.items():
            Path(self._dir.name, name).write_bytes(data)
        limit_blas_threads(threads)
        self._feeder = BatchFeeder(Path(self._dir.name, "model.onnx"), plan, threads)

    def observe(self, first: int, batches: list[Any], observers: bytes) -> bytes:
        # observers travel pickled: Ray hands numpy arrays over read-only, and observers update theirs in place
        return pickle.dumps(_observe(self._feeder, first, batches, pickle.loads(observers)))


def import_ray() -> Any:
    """The ``ray`` module, or a CalibrationError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise CalibrationError(f"--ray needs Ray, which is not installed; {_RAY_HINT}") from None
    return ray


# --- the driver -----------------------------------------------------------------------------------


def run_sharded(
    model: onnx.ModelProto,
    plan: FeedPlan,
    into: Mapping[str, Any],
    stream: Iterator[Any],
    resources: CalibrationResources,
    total: int | None,
    advance: Callable[[int], None],
) -> int:
    """Fill the observers ``into`` from ``stream`` on the workers of ``resources``; the batches read.

    Each task gets empty copies of ``into`` (:func:`blank_of`) and the driver merges the results
    into ``into``'s own objects, in batch order. ``advance(n)`` is called as chunks of n batches
    are merged (the progress bar).
    """

    def fresh() -> dict[str, Any]:
        memo: dict[int, Any] = {}
        return {name: blank_of(observer, memo) for name, observer in into.items()}

    with tempfile.TemporaryDirectory(prefix="onnxcomp-shard-") as tmp:
        path = Path(tmp, "model.onnx")
        augmented = with_outputs(model, list(plan.fetch)) if plan.fetch else model
        write_model_file(augmented, path, external=augmented.ByteSize() >= PROTOBUF_LIMIT)
        del augmented
        if resources.ray is not None:
            return _run_ray(path, plan, fresh, into, stream, resources, total, advance)
        return _run_local(path, plan, fresh, into, stream, resources.workers, total, advance)


def worker_context(module: str = __name__) -> multiprocessing.context.BaseContext:
    """'forkserver' where there is one, else 'spawn'; never a plain fork of the driver.

    ``module`` (the one defining the workers' entry points) is preloaded in the server too.

    A fork would copy the driver's onnxruntime thread pools (unsafe). The fork server imports
    onnxruntime and this module once and forks each worker from that clean process (no session
    made, so no thread pools), so a worker starts in milliseconds instead of re-importing numpy,
    onnx and onnxruntime as a spawned one does; that matters for the many small calibrations of
    bias correction (one per level).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Every worker re-imports the driver's main module before it starts (as with 'spawn'); with
    # the onnxcomp modules the driver has loaded (the CLI: every pass) already in the server, that
    # is quick. onnxruntime: runtime.ort_session imports it lazily. ('__main__' itself cannot be
    # preloaded: Python 3.11's fork server drops its path.)
    loaded = sorted(name for name in sys.modules if name == "onnxcomp" or name.startswith("onnxcomp."))
    context.set_forkserver_preload(["onnxruntime", *loaded, module])
    return context


def _threads(workers: int) -> int:
    """Intra-op threads per worker session: the cores shared out (oversubscribing slows every worker)."""
    return max(1, (os.cpu_count() or 1) // workers)


def _run_local(
    path: Path,
    plan: FeedPlan,
    fresh: Callable[[], dict[str, Any]],
    into: Mapping[str, Any],
    stream: Iterator[Any],
    workers: int,
    total: int | None,
    advance: Callable[[int], None],
) -> int:
    with ProcessPoolExecutor(workers, worker_context(), _start_local, (str(path), plan, _threads(workers))) as pool:

        def submit(first: int, chunk: list[Any]) -> Future[MutableMapping[str, Any]]:
            return pool.submit(_local_task, first, chunk, fresh())

        return _drive(submit, _local_result, into, stream, workers, total, advance)


def _run_ray(
    path: Path,
    plan: FeedPlan,
    fresh: Callable[[], dict[str, Any]],
    into: Mapping[str, Any],
    stream: Iterator[Any],
    resources: CalibrationResources,
    total: int | None,
    advance: Callable[[int], None],
) -> int:
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=resources.ray, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError
            raise CalibrationError(
                f"cannot connect to a Ray cluster at {resources.ray!r}: {first_line(exc)} "
                "(start one with `ray start --head`, or pass --workers N for local processes)"
            ) from exc
    workers = resources.workers if resources.workers > 1 else max(1, int(ray.cluster_resources().get("CPU", 1)))
    files = {p.name: p.read_bytes() for p in sorted(path.parent.iterdir())}
    model_ref = ray.put(files)  # once: every actor reads it from the object store
    del files
    actor = ray.remote(num_cpus=1)(RayWorker)
    actors = [actor.remote(model_ref, plan, 1) for _ in range(workers)]
    turn = iter(range(1 << 62))

    def submit(first: int, chunk: list[Any]) -> Any:
        return actors[next(turn) % workers].observe.remote(first, chunk, pickle.dumps(fresh()))

    def result(ref: Any) -> MutableMapping[str, Any]:
        try:
            return cast(MutableMapping[str, Any], pickle.loads(ray.get(ref)))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, OnnxCompError):
                raise cause from None
            raise CalibrationError(f"a Ray calibration worker failed: {first_line(cause or exc)}") from None

    try:
        return _drive(submit, result, into, stream, workers, total, advance)
    finally:
        for a in actors:
            ray.kill(a)


def _drive(
    submit: Callable[[int, list[Any]], Any],
    result: Callable[[Any], MutableMapping[str, Any]],
    merged: Mapping[str, Any],
    stream: Iterator[Any],
    workers: int,
    total: int | None,
    advance: Callable[[int], None],
) -> int:
    """Submit chunks with a bounded queue; merge the results in submission (= batch) order."""
    pending: deque[tuple[Any, int]] = deque()
    seen = 0

    def merge_oldest() -> None:
        nonlocal seen
        handle, size = pending.popleft()
        for name, part in result(handle).items():
            merged[name].merge(part)
        seen += size
        advance(size)

    for first, chunk in _chunks(stream, chunk_size(total, workers)):
        if len(pending) >= _IN_FLIGHT * workers:
            merge_oldest()
        pending.append((submit(first, chunk), len(chunk)))
    while pending:
        merge_oldest()
    return seen
