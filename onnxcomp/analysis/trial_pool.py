"""Independent tasks (candidate scores, distilled blocks) on local worker processes or Ray actors.

A :class:`TaskPool` runs ``task(state, item)`` for a stream of labelled items and yields the
results in the items' order, whatever order the workers finish in, so a run on N workers returns
what the loop ``[task(state, item) for item in items]`` returns. ``task`` is a module-level
function of an installed module (pickled by reference: a Ray worker imports it by name); ``state`` is what every task reads (a Scorer with its evaluation
batches and reference outputs, the teacher's tensors of a distillation) and is shipped ONCE: for
local processes pickled into a temporary file that each worker loads in its initializer, for Ray
put once in the object store and loaded by each actor when it starts. Per task only the item
travels (a candidate's serialised model, a block's inputs), and at most two items per worker are
in flight, so the driver can build the next items while the workers compute.

Local workers start from a fork server (as calibration sharding does,
:mod:`onnxcomp.calibration.shard`): never a plain fork of the driver, whose onnxruntime thread
pools are not fork-safe. An error in a worker comes back as one line naming the item (node or
candidate) and the worker (host and process id).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from onnxcomp.calibration.shard import import_ray, worker_context
from onnxcomp.errors import ConfigError, OnnxCompError
from onnxcomp.runtime import first_line

Task = Callable[[Any, Any], Any]

_IN_FLIGHT = 2  # items queued per worker: one running, one ready


@dataclass(frozen=True)
class PoolResources:
    """Where independent tasks run: ``processes`` local worker processes, or Ray actors on ``ray``.

    ``ray``: a cluster address (``auto``: the running one); with it, ``processes`` is the number
    of actors (1: one per CPU of the cluster). Neither: the caller runs the tasks itself.
    """

    processes: int = 1
    ray: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 1:
            raise ConfigError(f"the number of worker processes must be a positive integer, got {self.processes!r}")
        if self.ray is not None and (not isinstance(self.ray, str) or not self.ray.strip()):
            raise ConfigError(f"ray must be a cluster address such as 'auto', got {self.ray!r}")

    @property
    def remote(self) -> bool:
        """True when tasks leave this process."""
        return self.processes > 1 or self.ray is not None

    def describe(self) -> str:
        """Where the tasks run, for run notes."""
        if self.ray is not None:
            actors = f"{self.processes} actors" if self.processes > 1 else "one actor per CPU"
            return f"the Ray cluster {self.ray!r} ({actors})"
        return f"{self.processes} local worker processes"


class TaskError(OnnxCompError):
    """A task failed in a worker; the message names the item and the worker."""


def _where() -> str:
    return f"worker {socket.gethostname()} pid {os.getpid()}"


def _failure(label: str, exc: BaseException) -> TaskError:
    return TaskError(f"{label}: {first_line(exc)} ({_where()})")


# --- worker side ----------------------------------------------------------------------------------

_STATE: Any = None  # a local worker's state, loaded once by its initializer
_STATE_ERROR: str | None = None  # why it could not be loaded (raised by the first task, naming it)


def _load_state(path: str) -> None:
    global _STATE, _STATE_ERROR
    try:
        _STATE = pickle.loads(Path(path).read_bytes())
    except Exception as exc:  # noqa: BLE001 - an initializer's error would only break the pool
        _STATE_ERROR = f"loading the shared state failed: {first_line(exc)}"


def _local_task(task: Task, label: str, item: Any) -> Any:
    if _STATE_ERROR is not None:
        raise TaskError(f"{label}: {_STATE_ERROR} ({_where()})")
    try:
        return task(_STATE, item)
    except Exception as exc:  # noqa: BLE001 - every failure comes back as one line naming the item
        raise _failure(label, exc) from None


class RayTaskActor:
    """A Ray actor's state, loaded once from the object store; runs tasks on it."""

    def __init__(self, state: bytes) -> None:
        self._error: str | None = None
        try:
            self._state = pickle.loads(state)
        except Exception as exc:  # noqa: BLE001 - raised by the first task, naming it
            self._error = f"loading the shared state failed: {first_line(exc)}"

    def run(self, task: Task, label: str, item: bytes) -> bytes:
        # items and results travel pickled: Ray hands numpy arrays over read-only, a local worker's are writable
        if self._error is not None:
            raise TaskError(f"{label}: {self._error} ({_where()})")
        try:
            return pickle.dumps(task(self._state, pickle.loads(item)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001
            raise _failure(label, exc) from None


# --- driver side ----------------------------------------------------------------------------------


class TaskPool:
    """Workers holding ``state``, running ``task`` on labelled items in order (module docstring).

    Use as a context manager: the workers start on entry (the state is shipped then) and stop on
    exit, so several :meth:`map` calls share them.
    """

    def __init__(self, task: Task, state: Any, resources: PoolResources) -> None:
        if not resources.remote:
            raise ConfigError("a TaskPool needs worker processes (processes > 1) or a Ray address")
        self.task, self.resources = task, resources
        self._state = state
        self.workers = resources.processes
        self._pool: ProcessPoolExecutor | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._ray: Any = None
        self._actors: list[Any] = []
        self._turn = 0

    def __enter__(self) -> TaskPool:
        state = pickle.dumps(self._state, protocol=pickle.HIGHEST_PROTOCOL)
        self._state = None  # the workers hold it now
        if self.resources.ray is not None:
            self._start_ray(state)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxcomp-trials-")
            path = Path(self._tmp.name, "state.pickle")
            path.write_bytes(state)
            self._pool = ProcessPoolExecutor(self.workers, worker_context(__name__), _load_state, (str(path),))
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._tmp is not None:
            self._tmp.cleanup()
        for actor in self._actors:
            self._ray.kill(actor)
        self._pool, self._tmp, self._actors = None, None, []

    def _start_ray(self, state: bytes) -> None:
        ray = self._ray = import_ray()
        address = self.resources.ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False)
            except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError
                raise OnnxCompError(
                    f"cannot connect to a Ray cluster at {address!r}: {first_line(exc)} "
                    "(start one with `ray start --head`, or use local worker processes)"
                ) from exc
        if self.workers <= 1:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        state_ref = ray.put(state)  # once: every actor reads it from the object store
        actor = ray.remote(num_cpus=1)(RayTaskActor)
        self._actors = [actor.remote(state_ref) for _ in range(self.workers)]

    def _submit(self, label: str, item: Any) -> Any:
        if self._pool is not None:
            return self._pool.submit(_local_task, self.task, label, item)
        actor = self._actors[self._turn % len(self._actors)]
        self._turn += 1
        return actor.run.remote(self.task, label, pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))

    def _result(self, handle: Any, label: str) -> Any:
        if self._pool is not None:
            future: Future[Any] = handle
            try:
                return future.result()
            except BrokenProcessPool as exc:
                raise TaskError(
                    f"{label}: a worker process died ({first_line(exc)}); out of memory? try fewer worker processes"
                ) from None
        ray = self._ray
        try:
            return pickle.loads(ray.get(handle))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, OnnxCompError):
                raise cause from None
            raise TaskError(f"{label}: a Ray worker failed: {first_line(cause or exc)}") from None
        except ray.exceptions.RayError as exc:  # an actor died, the cluster went away
            raise TaskError(f"{label}: a Ray worker failed: {first_line(exc)}") from None

    def map(self, items: Iterable[tuple[str, Any]]) -> Iterator[Any]:
        """``task(state, item)`` for each ``(label, item)``, in order; items are drawn as workers free up."""
        if self._pool is None and not self._actors:
            raise RuntimeError("TaskPool.map outside its `with` block")
        pending: deque[tuple[Any, str]] = deque()
        for label, item in items:
            if len(pending) >= _IN_FLIGHT * self.workers:
                handle, old = pending.popleft()
                yield self._result(handle, old)
            pending.append((self._submit(label, item), label))
        while pending:
            handle, old = pending.popleft()
            yield self._result(handle, old)


def run_tasks(task: Task, state: Any, items: Iterable[tuple[str, Any]], resources: PoolResources) -> list[Any]:
    """``[task(state, item) for _, item in items]``: here, or on the workers of ``resources``."""
    if not resources.remote:
        return [task(state, item) for _, item in items]
    with TaskPool(task, state, resources) as pool:
        return list(pool.map(items))
