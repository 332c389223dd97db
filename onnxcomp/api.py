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
    calib_samples: int | None = None,
    batch_size: int = 16,
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

        ctx.calibration, ctx.calibration_name = calibration_source(
            calibration, proto, batch_size=batch_size, max_samples=calib_samples
        )
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


def quantize_options(
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    weights: str | None = None,
    activations: str | None = None,
    granularity: str | None = None,
    observer: str | None = None,
    weight_observer: str | None = None,
    dynamic: bool = False,
    symmetric_activations: bool | None = None,
    skip: Sequence[str] = (),
    emit: str | None = None,
    fp4_storage: str | None = None,
    scale_format: str | None = None,
) -> dict[str, Any]:
    """The ``quantize`` pass options from a config (file or mapping) plus flag-style overrides."""
    import tomllib

    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        path = Path(config)
        if not path.exists():
            raise OnnxCompError(f"{path}: no such config file")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise OnnxCompError(f"{path}: not valid TOML: {exc}") from exc
        data.pop("pass", None)

    def role(key: str, fmt: str | None, extra: dict[str, Any]) -> None:
        if fmt is None and not extra:
            return
        current = data.get(key, "int8")
        table = {"dtype": current} if isinstance(current, str) else dict(current)
        if fmt is not None:
            table = {"dtype": fmt} if fmt.lower() == "none" else {**table, "dtype": fmt}
        if str(table.get("dtype", "")).lower() != "none":
            table.update(extra)
        data[key] = table

    w_extra: dict[str, Any] = {}
    if granularity is not None:
        w_extra["granularity"] = granularity
    if weight_observer is not None:
        w_extra["observer"] = weight_observer
    if scale_format is not None:
        w_extra["scale_format"] = scale_format
    role("weights", weights, w_extra)
    a_extra: dict[str, Any] = {}
    if dynamic:
        a_extra["granularity"] = "token"
        a_extra["symmetric"] = True
    if observer is not None:
        a_extra["observer"] = observer
    if symmetric_activations is not None:
        a_extra["symmetric"] = symmetric_activations
    role("activations", activations, a_extra)
    if skip:
        data["skip"] = [*data.get("skip", []), *skip]
    if emit is not None:
        data["emit"] = emit
    if fp4_storage is not None:
        data["fp4_storage"] = fp4_storage
    return data


def quantize(
    model: ModelLike,
    output: str | os.PathLike[str] | None = None,
    *,
    calibration: CalibrationLike = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    fuse: bool = True,
    simulation_output: str | os.PathLike[str] | None = None,
    calib_samples: int | None = None,
    batch_size: int = 16,
    force: bool = False,
    progress: bool = False,
    external_data: bool | None = None,
    **flags: Any,
) -> RunReport:
    """Post-training quantization: fusions (unless ``fuse=False``) then the ``quantize`` pass.

    ``flags`` are :func:`quantize_options` keywords (weights, activations, granularity, ...).
    With ``simulation_output``, the fake-quant simulation model is written there too.
    """
    from onnxcomp.passes import with_fusions

    options = quantize_options(config, **flags)
    passes = with_fusions([make_pass("quantize", options)], fuse)
    kwargs = dict(calibration=calibration, force=force, progress=progress, external_data=external_data,
                  calib_samples=calib_samples, batch_size=batch_size)
    report = compress(model, passes, output, **kwargs)
    if simulation_output is not None:
        sim = make_pass("quantize", {**options, "emit": "simulate", "report_batches": 0})
        compress(model, with_fusions([sim], fuse), simulation_output, **kwargs)
    return report


def decompose(
    model: ModelLike,
    output: str | os.PathLike[str] | None = None,
    *,
    rank_rule: str | None = None,
    align: int | None = None,
    calibration: CalibrationLike = None,
    replay: str | os.PathLike[str] | None = None,
    ops: str = "conv",
    fuse: bool = True,
    options: Mapping[str, Any] | None = None,
    calib_samples: int | None = None,
    batch_size: int = 16,
    force: bool = False,
    progress: bool = False,
    external_data: bool | None = None,
) -> RunReport:
    """Low-rank tensor decomposition: fusions (unless ``fuse=False``) then ``decompose_conv``
    (``ops="conv"``), ``decompose_matmul`` (``"matmul"``) or both (``"all"``).

    ``rank_rule`` is ``auto`` (the default), ``energy:E``, ``ratio:R`` or ``rank:N`` and ``align``
    the rank multiple (default 16); ``calibration`` enables the least-squares refit of the
    second factors; ``replay`` applies a saved ``OUT.decomposition.json`` exactly; ``options``
    are further pass options (each pass takes the ones it knows; the explicit keywords win).
    The record is saved beside ``output`` as ``OUT.decomposition.json``.
    """
    from onnxcomp.options import option_fields
    from onnxcomp.passes import with_fusions
    from onnxcomp.pipeline import get_pass

    if ops not in ("conv", "matmul", "all"):
        raise OnnxCompError(f"ops must be 'conv', 'matmul' or 'all', got {ops!r}")
    names = {"conv": ["decompose_conv"], "matmul": ["decompose_matmul"],
             "all": ["decompose_conv", "decompose_matmul"]}
    wanted: dict[str, Any] = dict(options or {})
    for key, value in (("rank_rule", rank_rule), ("align", align), ("record", replay)):
        if value is not None:
            wanted[key] = str(value) if key == "record" else value
    fields = {n: {f for f, _, _ in option_fields(get_pass(n).Options)} for n in names[ops]}
    valid = set().union(*fields.values())
    unknown = sorted(set(wanted) - valid)
    if unknown:
        raise OnnxCompError(f"unknown decomposition option {unknown[0]!r}; valid options: {', '.join(sorted(valid))}")
    passes = with_fusions([make_pass(n, {k: v for k, v in wanted.items() if k in fields[n]}) for n in names[ops]], fuse)
    return compress(model, passes, output, calibration=calibration, force=force, progress=progress,
                    external_data=external_data, calib_samples=calib_samples, batch_size=batch_size)


def sparsify(
    model: ModelLike,
    output: str | os.PathLike[str] | None = None,
    *,
    pattern: str | None = None,
    prune_ratio: float | None = None,
    calibration: CalibrationLike = None,
    scope: str = "layer",
    ratios: Mapping[str, float] | None = None,
    round_to: int = 1,
    criterion: str = "l2",
    reconstruct: bool | None = None,
    skip: Sequence[str] = (),
    quantize: str | None = None,
    activations: str | None = None,
    fuse: bool = True,
    calib_samples: int | None = None,
    batch_size: int = 16,
    force: bool = False,
    progress: bool = False,
    external_data: bool | None = None,
) -> RunReport:
    """Sparsity: fusions (unless ``fuse=False``), then n:m ``pattern`` or channel pruning by ``prune_ratio``.

    Channel pruning reconstructs the consumers by least squares when calibration data is given
    (``reconstruct=None``), and can choose channels from data (``criterion="data"``). With
    ``quantize`` (a weight format: ``"int8"``, ``"int4"``, ...) the sparse model is quantized
    next (activations: ``activations``, default none = weight-only): the combined recipe.
    """
    from onnxcomp.sparsity.recipe import sparsify_passes

    options: dict[str, Any] = {"scope": scope, "round_to": round_to, "criterion": criterion,
                               "reconstruct": calibration is not None if reconstruct is None else reconstruct,
                               "ratios": dict(ratios or {})}
    passes = sparsify_passes(pattern=pattern, prune_ratio=prune_ratio, fuse=fuse, prune_options=options, skip=skip,
                             quantize=quantize, activations=activations)
    return compress(model, passes, output, calibration=calibration, force=force, progress=progress,
                    external_data=external_data, calib_samples=calib_samples, batch_size=batch_size)
