"""Running a recipe on a model and saving what it produces: the one path behind every API function.

:func:`run_plan` loads the model (mapped from ``RUN_MAP_WEIGHTS_FROM_BYTES`` of weights when it
writes a file), runs the pass manager under the calibration resources the run asked for, and
writes the output atomically with its resolved recipe and the records the passes made beside it.
A mapped model written to a file has its new weights spilled beside the output and is validated
from the written file (docs/scale.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from onnxcomp import model_io
from onnxcomp._version import __version__
from onnxcomp.calibration.data import calibration_source
from onnxcomp.calibration.shard import calibration_resources
from onnxcomp.errors import OnnxCompError, PassError
from onnxcomp.flags import RunOptions
from onnxcomp.framework import (
    Pass,
    PassContext,
    PassManager,
    Progress,
    Recipe,
    RunReport,
    dump_recipe,
    load_recipe,
    make_pass,
)
from onnxcomp.ir.mapped import is_large, is_mapped
from onnxcomp.ir.spill import spilling
from onnxcomp.model_io import load_model, save_model, write_text_atomic
from onnxcomp.quant.ascend.save import save_deploy
from onnxcomp.runtime import small_pages

ModelLike = str | os.PathLike[str] | onnx.ModelProto
RecipeLike = Recipe | str | os.PathLike[str] | Sequence[Pass | str]
CalibrationLike = str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | None


#: Front ends check the result once and locate a broken pass only when the result is invalid.
LOCATE = "locate"
#: A run that writes a model maps its input from this many bytes of weights (in the .onnx file or
#: its data files): the passes read them from the file, the reference run maps them, nothing holds
#: the parsed model. MiniLM-L3 (66 MB): INT4 1.13 -> 0.82 s and 404 -> 223 MB, W8A8 1.53 -> 0.92 s.
#: Below it the per-weight work of a mapped run (spilled and spliced weights, the output read back)
#: outweighs the parse: mapped, the 10-21 MB PP-OCR models ran 5-16% slower (in 40% less memory).
RUN_MAP_WEIGHTS_FROM_BYTES = 32 << 20


def as_model(model: ModelLike, map_from_bytes: int | None = None) -> tuple[onnx.ModelProto, Path | None]:
    """The model and the file it was read from (``map_from_bytes``: as :func:`model_io.load_model`)."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    return load_model(path, map_from_bytes=map_from_bytes), path


def as_recipe(recipe: RecipeLike) -> Recipe:
    """A validated :class:`Recipe` from a Recipe, a TOML path, or a list of passes / pass names."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    return Recipe(passes=[make_pass(p) if isinstance(p, str) else p for p in recipe], validate=LOCATE)


def output_artifacts(output: Path) -> dict[str, Path]:
    """Where the files written beside an output model go."""
    stem = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
    return {"recipe": output.with_name(f"{stem}.recipe.toml"), "dir": output.parent, "stem": Path(stem)}


def records_json(data: Any) -> str:
    """Records as JSON: one entry per line at the top level, compact inside (records hold every scale)."""
    if isinstance(data, list):
        rows = ",\n".join(json.dumps(item, sort_keys=True, separators=(",", ":")) for item in data)
        return f"[\n{rows}\n]\n"
    if isinstance(data, dict):
        rows = ",\n".join(
            f"{json.dumps(k)}:{json.dumps(v, sort_keys=True, separators=(',', ':'))}" for k, v in sorted(data.items())
        )
        return f"{{\n{rows}\n}}\n"
    return json.dumps(data) + "\n"


def _in_background(function: Callable[[Path], str], path: Path) -> Future[str]:
    """``function(path)`` on a thread of its own, started now (the thread ends with it)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="onnxcomp-hash")
    try:
        return pool.submit(function, path)
    finally:
        pool.shutdown(wait=False)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def run_plan(model: ModelLike, plan: Recipe, output: str | os.PathLike[str] | None, run: RunOptions) -> RunReport:
    with small_pages():  # weight-sized arrays come and go: no huge-page compaction stalls
        return _run_plan(model, plan, output, run)


def _run_plan(model: ModelLike, plan: Recipe, output: str | os.PathLike[str] | None, run: RunOptions) -> RunReport:
    # A run that writes a file maps its input from RUN_MAP_WEIGHTS_FROM_BYTES: without an output the
    # caller gets the model itself, mapped only from model_io.MAP_WEIGHTS_FROM_BYTES (load_model's).
    threshold = min(RUN_MAP_WEIGHTS_FROM_BYTES, model_io.MAP_WEIGHTS_FROM_BYTES) if output is not None else None
    validate = run.validation()
    if validate is not None:  # the run's choice wins over the recipe's, and the written recipe says so
        plan = dataclasses.replace(plan, validate=validate)
    proto, source = as_model(model, map_from_bytes=threshold)
    out_path = Path(output) if output is not None else None
    if out_path is None or not is_mapped(proto):
        return _run_and_save(proto, source, out_path, plan, run)
    # A mapped model written to a file: new weights go to a spill file beside the output as passes
    # make them (ir.spill.spilling) and the output is validated from the file written (docs/scale.md).
    with spilling(out_path.parent if out_path.parent.is_dir() else None):
        report = _run_and_save(proto, source, out_path, plan, run)
        written = report.written or out_path
        if is_mapped(report.model) and written.exists():  # the spilled weights go with their folder
            # Under 1 GiB the caller gets an ordinary proto (onnx.checker, onnx.save take it as is);
            # above, a map of the output: reading it in would cost its size again
            report.model = load_model(written, check=False, mapped=is_large(report.model))
    return report


def _check_or_locate(
    check: Callable[[Path], None], plan: Recipe, proto: onnx.ModelProto, ctx: PassContext, run: RunOptions, path: Path
) -> None:
    """The written file's check; if it finds the model invalid, the pipeline runs again checking
    after each pass (in memory) to name the pass that broke it, as ``validate="locate"`` does."""
    try:
        check(path)
    except PassError as exc:
        if "produced an invalid model" not in str(exc):
            raise
        fresh = PassContext(**{**vars(ctx), "artifacts": {}})
        with calibration_resources(run.calibration_resources()):
            PassManager(plan.passes, validate="each").run(proto, fresh)  # raises, naming the pass
        raise


def _run_and_save(
    proto: onnx.ModelProto, source: Path | None, out_path: Path | None, plan: Recipe, run: RunOptions
) -> RunReport:
    if out_path is not None and source is not None and out_path.resolve() == source.resolve():
        raise OnnxCompError(f"{out_path}: output would overwrite the input model; choose another path")
    if out_path is not None and out_path.exists() and not run.force:
        raise OnnxCompError(f"{out_path}: already exists; choose another output path or pass --force")
    # The recipe names the input by its hash: read while the passes run (hashlib lets go of the GIL)
    input_hash = _in_background(sha256_file, source) if out_path is not None and source is not None else None
    # load_model checked the file in full (or repaired its declared shapes): the manager need not again
    ctx = PassContext(
        seed=plan.seed, progress=Progress(run.progress), source_checked=source is not None, source_path=source
    )
    if run.calibration is not None:
        ctx.calibration, ctx.calibration_name = calibration_source(
            run.calibration,
            proto,
            batch_size=run.batch_size,
            max_samples=run.calib_samples,
            batch_axis=run.batch_axis,
        )
    with calibration_resources(run.calibration_resources()) as calibration_notes:
        report = PassManager(plan.passes, validate=plan.validate, on_written_file=out_path is not None).run(proto, ctx)
    report.notes.extend(calibration_notes)
    if report.check_written is not None and plan.validate == LOCATE:
        report.check_written = partial(_check_or_locate, report.check_written, plan, proto, ctx, run)
    # A deliverable onnxruntime cannot validate (the Ascend deploy model) is OUT.onnx; the validated
    # model it was derived with goes beside it as OUT.fake_quant.onnx (docs/ascend.md).
    deploy = ctx.artifacts.pop("deploy_model", None)
    if out_path is not None:
        paths = output_artifacts(out_path)
        serialized = report.serialized if deploy is None else None  # the validated bytes: no re-serialisation
        if deploy is None:
            save_model(report.model, out_path, run.external_data, run.force, serialized, report.check_written)
        else:  # AMCT's layout: one external file per initializer from 2 GB on (docs/ascend.md)
            save_deploy(deploy, out_path, run.external_data, run.force)
        if deploy is not None:
            fake_quant = out_path.with_name(f"{paths['stem']}.fake_quant.onnx")
            save_model(report.model, fake_quant, run.external_data, run.force, check=report.check_written)
            report.written = fake_quant
        meta: dict[str, Any] = {
            "onnxcomp": __version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        }
        if source is not None and input_hash is not None:
            meta["input"] = source.name
            meta["input_sha256"] = input_hash.result()
        if ctx.calibration_name:
            meta["calibration"] = ctx.calibration_name
        for note in report.notes:
            meta.setdefault("notes", []).append(note)
        write_text_atomic(paths["recipe"], dump_recipe(plan, meta))
        for key, data in sorted(ctx.artifacts.items()):
            if isinstance(data, str):  # a text artifact names its own extension (OUT.quant_config.toml)
                write_text_atomic(out_path.with_name(f"{paths['stem']}.{key}"), data)
            else:
                write_text_atomic(out_path.with_name(f"{paths['stem']}.{key}.json"), records_json(data))
    report.serialized = None  # model-sized, and the caller has report.model
    report.check_written = None  # it ran on the written file (or there is no file)
    return report
