"""Where candidate models are scored: threads here, or local worker processes / Ray actors.

:class:`Trials` is what the sensitivity analysis, the greedy curve and the accuracy search
(:mod:`onnxcomp.quant.tuning`) call to score candidates, given by their ``fallback`` tables: on
``trial_workers`` threads (each builds and scores its candidate), or built here one after the
other and scored by the workers of a :class:`onnxcomp.analysis.trial_pool.TaskPool` where the
run calibrates (``--workers N`` local processes, or Ray actors with ``--ray``), which hold the
Scorer. Every way gives the same scores, in the same order (docs/accuracy.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import onnx

from onnxcomp.analysis.scoring import Scorer
from onnxcomp.analysis.trial_pool import PoolResources, TaskPool
from onnxcomp.calibration.shard import CalibrationResources
from onnxcomp.errors import ConfigError, OnnxCompError
from onnxcomp.runtime import PROTOBUF_LIMIT

Build = Callable[[dict[str, Any]], onnx.ModelProto]


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(x) for x in items]``, on ``workers`` threads when > 1 (onnxruntime releases the GIL while
    it runs; every candidate builds its own graph and session). The first item runs alone, so it
    fills the shared statistics cache before the others read it. Order and results are the same."""
    if workers <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    first = fn(items[0])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [first, *pool.map(fn, items[1:])]


def score_task(scorer: Scorer, candidate: bytes) -> float:
    """A worker's task: the metric of one serialised candidate (the driver counts it)."""
    return scorer.measure(candidate)


class Trials:
    """How candidates are scored: built and scored on ``threads`` here, or built here one after the
    other (cheap: the statistics are cached) and scored by the worker processes / Ray actors of
    ``pool``, which received the Scorer (evaluation batches, reference outputs, evaluator) once.
    Every way gives the same scores: a candidate is the same bytes and runs the same session."""

    def __init__(self, scorer: Scorer, build: Build, threads: int = 1, pool: TaskPool | None = None) -> None:
        self.scorer, self.build, self.threads, self.pool = scorer, build, threads, pool

    def scores(self, jobs: Sequence[tuple[str, dict[str, Any]]]) -> Iterator[float]:
        """The score of each ``(label, fallback)`` candidate, in order (labels name it in errors)."""
        if self.pool is None:
            yield from parallel_map(lambda job: self.scorer.score(self.build(job[1])), jobs, self.threads)
            return

        def candidates() -> Iterator[tuple[str, bytes]]:
            for label, fallback in jobs:
                model = self.build(fallback)
                if model.ByteSize() >= PROTOBUF_LIMIT:
                    raise OnnxCompError(
                        f"{label}: the candidate model is over 2 GB; score candidates on threads "
                        "(--trial-workers N) instead of worker processes (--workers N) or Ray"
                    )
                self.scorer.count()
                yield label, model.SerializeToString(deterministic=True)

        yield from self.pool.map(candidates())

    def score(self, fallback: dict[str, Any]) -> float:
        """One candidate, here (a trial that depends on the previous one gains nothing from a worker)."""
        return self.scorer.score(self.build(fallback))


def trial_resources(threads: int, run: CalibrationResources) -> PoolResources:
    """Where candidates are scored: on ``threads`` here when asked for (> 1), else where the run
    calibrates: its ``workers`` local processes or its Ray cluster (``--workers N`` / ``--ray``)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"trial_workers must be a positive integer, got {threads!r}")
    if threads > 1:
        return PoolResources()
    return PoolResources(run.workers, run.ray)
