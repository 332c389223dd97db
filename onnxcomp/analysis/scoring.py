"""One way to score a candidate model: built-in fidelity metrics or the user's evaluator.

:class:`Scorer` runs the float (reference) model once on fixed evaluation batches, keeps its
outputs, and scores each candidate -- a real, deployable model run by onnxruntime at
ORT_ENABLE_ALL -- by a metric against them (:class:`onnxcomp.analysis.comparison.ErrorStats`):

* ``cos``: the smallest output cosine similarity, ``sqnr``: the smallest output SQNR (dB),
* ``agree``: top-1 agreement (argmax over the last axis) of the first class-score output,
* ``score``: the user's evaluator, a function ``f(model_path) -> float`` (higher is better) loaded
  from a Python file with :func:`load_evaluator`; the candidate is written to a temporary file.

Sensitivity analysis, the accuracy-target search and observer choices all evaluate candidates
through this class, so they share the reference outputs and the metric definitions.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx

from onnxcomp.analysis.comparison import ErrorStats
from onnxcomp.errors import OnnxCompError
from onnxcomp.runtime import ort_session

Evaluator = Callable[[str], float]


def load_evaluator(spec: str) -> Evaluator:
    """``path/to/file.py:function`` -> the function; a one-line OnnxCompError naming what is wrong.

    The result pickles as its spec (the file's absolute path), so a worker process or a Ray actor
    that receives it imports the file itself (:mod:`onnxcomp.analysis.trial_pool`).
    """
    return FileEvaluator(spec)


def _import_function(spec: str, path: Path, func: str) -> Callable[[str], Any]:
    name = f"onnxcomp_evaluator_{abs(hash(str(path)))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise OnnxCompError(f"evaluator {spec!r}: {path} is not a loadable Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise OnnxCompError(f"evaluator {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func, None)
    if not callable(fn):
        raise OnnxCompError(f"evaluator {spec!r}: {path} has no function {func!r}")
    return cast(Callable[[str], Any], fn)


class FileEvaluator:
    """The user's ``FILE.py:FUNCTION`` evaluator, imported by path; pickles as that path (absolute)."""

    def __init__(self, spec: str) -> None:
        path_text, sep, func = str(spec).rpartition(":")
        if not sep or not path_text or not func.isidentifier():
            raise OnnxCompError(f"evaluator {spec!r}: expected FILE.py:FUNCTION, e.g. eval.py:accuracy")
        path = Path(path_text)
        if not path.is_file():
            raise OnnxCompError(f"evaluator {spec!r}: no such file {path}")
        self.spec, self.path, self.func = str(spec), path.resolve(), func
        self._fn = _import_function(self.spec, self.path, func)

    def __reduce__(self) -> tuple[Any, ...]:
        # a worker's working directory may differ: it imports the file by its absolute path
        return (FileEvaluator, (f"{self.path}:{self.func}",))

    def __call__(self, model_path: str) -> float:
        try:
            value = self._fn(model_path)
        except Exception as exc:  # noqa: BLE001
            raise OnnxCompError(f"evaluator {self.spec!r} failed on {model_path}: {type(exc).__name__}: {exc}") from exc
        try:
            return float(value)
        except (TypeError, ValueError):
            raise OnnxCompError(f"evaluator {self.spec!r} returned {value!r}, not a number") from None


class Scorer:
    """Scores candidates against ``reference`` on ``batches`` by ``metric`` (module docstring)."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        batches: Sequence[Mapping[str, np.ndarray]],
        metric: str = "cos",
        evaluator: Evaluator | None = None,
    ) -> None:
        if metric == "score" and evaluator is None:
            raise OnnxCompError("metric 'score' needs an evaluator (--evaluator FILE.py:FUNCTION)")
        self.metric = metric
        self.evaluator = evaluator
        self.batches = [dict(b) for b in batches]
        self.outputs = [o.name for o in reference.graph.output if o.type.HasField("tensor_type")]
        self.trials = 0
        self._lock = threading.Lock()
        self._reference: onnx.ModelProto | None = reference
        self._ref: list[list[np.ndarray]] = []
        if evaluator is None:
            if not self.batches:
                raise OnnxCompError("no evaluation data: pass --calib DATA (or --eval-data DATA)")
            session = ort_session(reference, level="disable")
            self._ref = [self._run(session, b) for b in self.batches]

    def __getstate__(self) -> dict[str, Any]:
        # what a worker needs to score: the batches, the reference outputs, the metric, the evaluator
        state = dict(self.__dict__)
        del state["_lock"]
        state["_reference"] = None  # only reference_score() reads it, in the driver
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def count(self, trials: int = 1) -> None:
        """Count candidates scored elsewhere (by :meth:`measure` in a worker) in :attr:`trials`."""
        with self._lock:  # candidates may be scored from several threads
            self.trials += trials

    def _run(self, session: Any, batch: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = {i.name for i in session.get_inputs()}
        return [np.asarray(v) for v in session.run(self.outputs, {k: v for k, v in batch.items() if k in names})]

    def reference_score(self) -> float:
        """The float model's own score (perfect for the built-in metrics)."""
        if self.evaluator is not None:
            assert self._reference is not None, "a Scorer sent to a worker only measures candidates"
            return self._evaluate(self._reference)
        return float("inf") if self.metric == "sqnr" else 1.0

    def score(self, candidate: onnx.ModelProto | bytes) -> float:
        """The metric of ``candidate`` (a model or its serialisation), counted in :attr:`trials`."""
        self.count()
        return self.measure(candidate)

    def measure(self, candidate: onnx.ModelProto | bytes) -> float:
        """The metric of ``candidate``, not counted (the driver counts what its workers measure)."""
        if self.evaluator is not None:
            return self._evaluate(candidate)
        session = ort_session(candidate, level="all")
        stats = [ErrorStats() for _ in self.outputs]
        for batch, refs in zip(self.batches, self._ref, strict=True):
            for st, ref, test in zip(stats, refs, self._run(session, batch), strict=True):
                if np.issubdtype(ref.dtype, np.floating):
                    st.add(ref, test, class_scores=ref.ndim >= 2 and ref.shape[-1] > 1)
        floats = [st for st, r in zip(stats, self._ref[0], strict=True) if np.issubdtype(r.dtype, np.floating)]
        if not floats:
            raise OnnxCompError("the model has no float output to compare; use --evaluator FILE.py:FUNCTION")
        if self.metric == "agree":
            top1 = [st.top1() for st in floats if st.top1() is not None]
            if not top1:
                raise OnnxCompError("metric agree needs an output of class scores (last axis > 1); use cos")
            return float(top1[0])  # type: ignore[arg-type]
        if self.metric == "sqnr":
            return min(st.sqnr_db() for st in floats)
        return min(st.cosine() for st in floats)

    def _evaluate(self, model: onnx.ModelProto | bytes) -> float:
        assert self.evaluator is not None
        fd, name = tempfile.mkstemp(suffix=".onnx", prefix="onnxcomp_candidate_")
        os.close(fd)
        try:
            if isinstance(model, bytes):
                Path(name).write_bytes(model)
            else:
                onnx.save(model, name)
            return self.evaluator(name)
        finally:
            Path(name).unlink(missing_ok=True)
