"""The Python API: the same pass manager the CLI drives.

>>> import onnxcomp
>>> report = onnxcomp.fuse("model.onnx", "model.fused.onnx")
>>> report = onnxcomp.compress("model.onnx", "recipe.toml", "out.onnx")
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcomp.errors import OnnxCompError
from onnxcomp.manager import PassManager, RunReport
from onnxcomp.model_io import load_model, save_model, write_text_atomic
from onnxcomp.pipeline import Pass, PassContext, Progress, make_pass
from onnxcomp.recipe import Recipe, dump_recipe, load_recipe

ModelLike = str | os.PathLike[str] | onnx.ModelProto
RecipeLike = Recipe | str | os.PathLike[str] | Sequence[Pass | str]
CalibrationLike = str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | None


def _as_model(model: ModelLike) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    return load_model(path), path


def _as_recipe(recipe: RecipeLike) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    return Recipe(passes=[make_pass(p) if isinstance(p, str) else p for p in recipe])


def output_artifacts(output: Path) -> dict[str, Path]:
    """Where the files written beside an output model go."""
    stem = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
    return {"recipe": output.with_name(f"{stem}.recipe.toml"), "dir": output.parent, "stem": Path(stem)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def compress(
    model: ModelLike,
    recipe: RecipeLike,
    output: str | os.PathLike[str] | None = None,
    *,
    calibration: CalibrationLike = None,
    force: bool = False,
    progress: bool = False,
    external_data: bool | None = None,
) -> RunReport:
    """Run a recipe (or a list of passes) on a model; save it and its resolved recipe if ``output``.

    ``calibration`` is an .npz file, a directory of .npz/.npy files, or any iterable of
    ``{input name: array}`` batches (first axis = samples).
    """
    proto, source = _as_model(model)
    plan = _as_recipe(recipe)
    out_path = Path(output) if output is not None else None
    if out_path is not None and source is not None and out_path.resolve() == source.resolve():
        raise OnnxCompError(f"{out_path}: output would overwrite the input model; choose another path")
    if out_path is not None and out_path.exists() and not force:
        raise OnnxCompError(f"{out_path}: already exists; choose another output path or pass --force")
    ctx = PassContext(seed=plan.seed, progress=Progress(progress))
    if calibration is not None:
        from onnxcomp.calibration_data import calibration_source

        ctx.calibration, ctx.calibration_name = calibration_source(calibration, proto)
    report = PassManager(plan.passes, validate=plan.validate).run(proto, ctx)
    if out_path is not None:
        save_model(report.model, out_path, external_data=external_data, overwrite=force)
        paths = output_artifacts(out_path)
        meta: dict[str, Any] = {"onnxcomp": _version(), "onnx": onnx.__version__, "onnxruntime": _ort_version()}
        if source is not None:
            meta["input"] = source.name
            meta["input_sha256"] = _sha256(source)
        if ctx.calibration_name:
            meta["calibration"] = ctx.calibration_name
        for note in report.notes:
            meta.setdefault("notes", []).append(note)
        write_text_atomic(paths["recipe"], dump_recipe(plan, meta))
        for key, data in sorted(ctx.artifacts.items()):
            write_text_atomic(out_path.with_name(f"{paths['stem']}.{key}.json"), json.dumps(data, indent=1, sort_keys=True) + "\n")
    return report


def fuse(model: ModelLike, output: str | os.PathLike[str] | None = None, **kwargs: Any) -> RunReport:
    """Deployment fusions (BN folding, affine folding, MatMul+Add -> Gemm, cleanup)."""
    from onnxcomp.passes import FUSE_PIPELINE

    return compress(model, list(FUSE_PIPELINE), output, **kwargs)


def _version() -> str:
    from onnxcomp import __version__

    return __version__


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
