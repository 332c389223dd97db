"""The pass manager: runs a pipeline on a model, tidies, validates, and names the failing pass."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import onnx
from onnx import version_converter

from onnxcomp import ir
from onnxcomp.errors import OnnxCompError, PassError, ValidationError
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.validation import InferenceSample, check_inference, inference_sample
from onnxcomp.ir.mapped import attach_mapped, detach_mapped, is_mapped
from onnxcomp.ir.spill import spill_constants
from onnxcomp.model_io import (
    MAX_EMIT_OPSET,
    check_model,
    default_opset,
    repair_declared_shapes,
    runs_on_ort,
    serialize_model,
    validate_model,
)
from onnxcomp.runtime import first_line, ort_session, release_freed_memory

log = logging.getLogger(__name__)


@dataclass
class StepReport:
    name: str
    result: PassResult
    seconds: float


@dataclass
class RunReport:
    """The output model and what each pass did."""

    model: onnx.ModelProto
    steps: list[StepReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: ``model``'s bytes when the final validation serialised it (saved as they are, then dropped)
    serialized: bytes | None = field(default=None, repr=False)
    #: the final validation, when it is to run on the written file (a mapped output): call it with
    #: the path the model was written to (``model_io.save_model(check=...)`` does, before publishing)
    check_written: Callable[[Path], None] | None = field(default=None, repr=False)
    #: the file ``model`` was saved to when it is not the output path (``OUT.fake_quant.onnx``)
    written: Path | None = None

    def result(self, name: str) -> PassResult:
        """The result of the first step named ``name``."""
        for step in self.steps:
            if step.name == name:
                return step.result
        raise KeyError(name)


def convert_opset(model: onnx.ModelProto, target: int, why: str) -> onnx.ModelProto:
    """onnx's version converter with a one-line error naming the reason for the conversion."""
    bare, mapped = detach_mapped(model)  # the converter drops external references: keep them aside
    try:
        converted = version_converter.convert_version(bare, target)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError/IndexError/...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OnnxCompError(
            f"cannot convert the model from opset {default_opset(model)} to {target} ({why}): {first}; "
            f"re-export the model at opset {target}"
        ) from exc
    attach_mapped(converted, mapped)
    return converted


class PassManager:
    """Runs passes in order on a private copy of a model.

    After each pass that modified the graph it removes dead nodes and sorts the graph; with
    ``validate="each"`` it also checks the model (onnx.checker, then one run at ORT_ENABLE_ALL
    compared with the input model's outputs: :mod:`onnxcomp.framework.validation`), so a broken
    rewrite is reported with the pass that made it. ``"locate"`` checks only the result
    and, if it is invalid, runs the pipeline again checking after each pass to name the culprit:
    the same diagnosis, paid for only when something is wrong. The caller's model is never touched.
    """

    def __init__(self, passes: Sequence[Pass], validate: str = "each", on_written_file: bool = False) -> None:
        self.passes = list(passes)
        self.validate = validate
        #: the output will be written: a mapped output's final validation then runs on that file
        #: (``RunReport.check_written``) instead of a session over the in-memory model
        self.on_written_file = on_written_file

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> RunReport:
        if self.validate != "locate":
            return self._run(model, ctx)
        fresh = PassContext(**{**vars(ctx), "artifacts": {}}) if ctx is not None else None
        try:
            return PassManager(self.passes, "end", self.on_written_file)._run(model, ctx)
        except PassError as exc:
            if "produced an invalid model" not in str(exc):
                raise
        return PassManager(self.passes, "each", self.on_written_file)._run(model, fresh)  # raises, naming the pass

    def _run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> RunReport:
        ctx = ctx or PassContext()
        # A stale declared shape is the model's, not a pass's (a model that passed the full check has none).
        model, repaired = (model, []) if ctx.source_checked else repair_declared_shapes(model)
        if ctx.source_model is None:
            ctx.source_model = model
        report = RunReport(model=model, notes=repaired)
        ctx.graph_is_source = model is ctx.source_model
        opset = default_opset(model)
        if opset > MAX_EMIT_OPSET:
            ctx.graph_is_source = False
            model = convert_opset(model, MAX_EMIT_OPSET, f"onnxcomp emits opset <= {MAX_EMIT_OPSET}")
            report.notes.append(
                f"converted opset {opset} -> {MAX_EMIT_OPSET} (onnxcomp emits opset <= {MAX_EMIT_OPSET})"
            )
        sample = self._sample(model, ctx)
        graph = ir.import_model(model)
        template = model
        done: list[str] = []
        for index, pass_ in enumerate(self.passes):
            where = f"pass {pass_.name!r} (step {index + 1} of {len(self.passes)})"
            need = pass_.min_opset()
            if need is not None and need > ir.default_opset(graph):
                if need > MAX_EMIT_OPSET:
                    raise PassError(f"{where}: needs opset {need}, above the {MAX_EMIT_OPSET} onnxcomp emits")
                before, why = ir.default_opset(graph), f"{pass_.name} needs opset {need}"
                upgraded = ir.upgrade_graph(graph, template, partial(convert_opset, target=need, why=why))
                if upgraded is None:  # the converter changed a weight: convert the whole model
                    upgraded = ir.import_model(convert_opset(ir.export_model(graph, template), need, why))
                graph = upgraded
                ctx.graph_is_source = False
                del upgraded  # ``graph`` holds it: ``del graph`` below frees it before validation
                report.notes.append(f"converted opset {before} -> {need} for {pass_.name}")
                log.info("converted opset %d -> %d for %s", before, need, pass_.name)
            start = time.perf_counter()
            try:
                result = self._run_pass(pass_, graph, ctx)
            except OnnxCompError as exc:
                raise PassError(f"{where} failed: {exc}") from exc
            except Exception as exc:
                raise PassError(
                    f"{where} failed with {type(exc).__name__}: {exc}; rerun with --debug for a traceback"
                ) from exc
            if result.modified:
                ctx.graph_is_source = False
                ir.finalize(graph)
                spill_constants(graph)  # a run writing a mapped model: new weights to disk (ir.spill)
                if self.validate == "each":
                    exported, close = ir.export_model(graph, template), self._close(index + 1)
                    self._validate(exported, where, done, sample, close, keep=False)
                    del exported  # a model-sized copy: not kept while the next pass runs
            seconds = time.perf_counter() - start
            report.steps.append(StepReport(pass_.name, result, seconds))
            done.append(pass_.name)
            log.info("%s: %s (%.2fs)", pass_.name, result.summary(), seconds)
        # Nothing changed (no pass, no opset upgrade): the model itself (an export is not byte-identical).
        unchanged = not any(s.result.modified for s in report.steps) and ir.default_opset(graph) == default_opset(model)
        out = model if unchanged else ir.export_model(graph, template)
        del graph  # its weights are in ``out`` now: one copy fewer while validation loads a session
        if self.validate == "end" or (self.validate == "each" and not any(s.result.modified for s in report.steps)):
            close = self._close(len(self.passes))
            if self.on_written_file and is_mapped(out) and runs_on_ort(out):
                report.check_written = partial(self._validate_file, out, "the pipeline", list(done), sample, close)
            else:
                report.serialized = self._validate(out, "the pipeline", done, sample, close)
        report.model = out
        return report

    def _sample(self, model: onnx.ModelProto, ctx: PassContext) -> InferenceSample | None:
        """The input model's outputs on one sample, the reference every validation compares with."""
        if self.validate == "none":
            return None
        # An in-memory model unchanged since it was read: onnxruntime reads its file, no serialisation.
        # A mapped one goes as it is: onnxruntime maps its weights from their files (a 700 MB model
        # read whole from its file took 1.3 s and 1 GB; mapped, 0.01 s and half of that).
        unchanged = model is ctx.source_model and not is_mapped(model)  # not after a conversion
        file = ctx.source_path if unchanged else None
        found = inference_sample(model, ctx.calibration() if ctx.calibration is not None else None, file)
        if isinstance(found, str):
            log.info("validation creates sessions only: %s", found)
            return None
        return found

    @staticmethod
    def _run_pass(pass_: Pass, graph: ir.Graph, ctx: PassContext) -> PassResult:
        """Run ``pass_`` on the graph, then (``pass_.bodies``) on each If/Loop/Scan body."""
        result = pass_.run(graph, ctx)
        if not pass_.bodies:
            return result
        for body, where in list(ir.iter_graphs(graph))[1:]:
            inner = pass_.run(body, ctx)
            result.modified |= inner.modified
            for key, value in inner.stats.items():
                result.stats[key] = result.stats.get(key, 0) + value
            result.changed += [f"{item} ({where})" for item in inner.changed]
            result.declined += [(name, f"{where}: {reason}") for name, reason in inner.declined]
            result.notes += [f"{where}: {note}" for note in inner.notes]
        return result

    def _close(self, count: int) -> bool:
        """Whether the first ``count`` passes keep the outputs close to the input's (a pass sets
        ``keeps_outputs_close = False`` when it removes capacity at a user-chosen ratio: pruning,
        low rank); validation then checks shapes and finiteness but not the cosine bound."""
        return all(getattr(p, "keeps_outputs_close", True) for p in self.passes[:count])

    @staticmethod
    def _validate(
        model: onnx.ModelProto,
        where: str,
        done: list[str],
        sample: InferenceSample | None = None,
        close: bool = True,
        keep: bool = True,
    ) -> bytes | None:
        """Check ``model`` and run it once; returns its bytes (:func:`serialize_model`), serialised
        once (``keep=False``: None, for the checks between passes).

        The checker and onnxruntime read the bytes from a temporary file, and the bytes object is
        dropped meanwhile: the session's peak (about twice the model while onnxruntime parses it)
        does not stack on a model-sized copy; they are read back once the session is gone.
        """
        try:
            serialized = serialize_model(model)
            if serialized is None:  # external data: the checker and onnxruntime read their own
                session = validate_model(model)
                if session is not None and sample is not None:
                    check_inference(session, sample, compare_values=close)
                return None
            with tempfile.TemporaryDirectory(prefix="onnxcomp-validate-") as tmp:
                file = Path(tmp) / "model.onnx"
                file.write_bytes(serialized)
                del serialized
                release_freed_memory()  # the passes' freed buffers back to the system first
                session = validate_model(model, file=file)
                if session is not None and sample is not None:
                    check_inference(session, sample, compare_values=close)
                del session
                return file.read_bytes() if keep else None
        except ValidationError as exc:
            after = f" (after {', '.join(done)})" if done else ""
            raise PassError(f"{where} produced an invalid model{after}: {exc}") from exc

    @staticmethod
    def _validate_file(
        model: onnx.ModelProto,
        where: str,
        done: list[str],
        sample: InferenceSample | None,
        close: bool,
        path: Path,
    ) -> None:
        """:meth:`_validate` on the file ``model`` was written to: onnx.checker on the in-memory
        model (references only: no weight bytes), onnxruntime from the file and its external data
        (mapped by onnxruntime, without prepacked copies), so no session holds the output's weights
        from memory."""
        try:
            check_model(model)
            try:
                config = {"session.disable_prepacking": "1"}  # kernels read the mapped weights in place
                session = ort_session(Path(path), level="all", config=config, arena=False)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
                raise ValidationError(f"onnxruntime cannot load it: {first_line(exc)}") from exc
            if sample is not None:
                check_inference(session, sample, compare_values=close)
        except ValidationError as exc:
            after = f" (after {', '.join(done)})" if done else ""
            raise PassError(f"{where} produced an invalid model{after}: {exc}") from exc
