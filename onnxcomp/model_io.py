"""Loading, validating and saving ONNX models.

Rules: the input file is never modified; outputs are written atomically (temporary files in the
destination directory, then ``os.replace``); models of 2 GB and more are saved with external data;
every failure is a one-line :class:`ModelLoadError` / :class:`ValidationError` naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxcomp.errors import ModelLoadError, OnnxCompError, ValidationError
from onnxcomp.ir.inline_data import load_without_inline_data, map_inline_data
from onnxcomp.ir.mapped import (
    MIN_MAPPED_BYTES,
    checkable_file,
    is_mapped,
    map_external_data,
    mapped_bytes,
    materialized,
)
from onnxcomp.runtime import PROTOBUF_LIMIT, fits_protobuf, ort_session, write_model_file

log = logging.getLogger(__name__)

#: Models with this many bytes of weights (in external data files, or inside the .onnx file:
#: ``ir.inline_data``) are loaded *mapped*: weights stay in their files and are read through
#: memory maps one initializer at a time (``ir.mapped``, docs/scale.md).
MAP_WEIGHTS_FROM_BYTES = 256 << 20

#: onnxcomp never emits a model with a default-domain opset above this (ORT has no Q/DQ kernels
#: above it; docs/onnxruntime.md).
MAX_EMIT_OPSET = 25


@functools.cache
def ort_max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads (probed once)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    best = MAX_EMIT_OPSET
    for opset in range(MAX_EMIT_OPSET, MAX_EMIT_OPSET + 10):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - any failure means "not supported"
            break
        best = opset
    return best


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def load_model(
    path: str | os.PathLike[str], check: bool = True, mapped: bool | None = None, map_from_bytes: int | None = None
) -> onnx.ModelProto:
    """Read an .onnx file (external data included) and check it; one-line errors otherwise.

    ``mapped`` (default: from ``map_from_bytes``, else ``MAP_WEIGHTS_FROM_BYTES``, of weights in data
    files or in the .onnx file) leaves the big weights in their files, read through memory maps when
    a pass needs them (``ir.mapped``). Such a proto names those files by absolute path:
    ``onnx.checker`` refuses it, and ``onnx.save`` writes a file onnxruntime will not load. Pass it
    to onnxcomp's commands and :func:`save_model`, or read the weights in first with
    ``onnxcomp.ir.mapped.materialized`` (``mapped=False`` loads them in memory from the start).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: file is empty; expected an ONNX model")
    inline: dict[int, tuple[int, int]] = {}
    threshold = MAP_WEIGHTS_FROM_BYTES if map_from_bytes is None else map_from_bytes
    try:
        if mapped is not False and (mapped or path.stat().st_size >= threshold):
            # Big weights inside the file: the model is read without them (ir.inline_data)
            model, inline, inline_bytes = load_without_inline_data(path, MIN_MAPPED_BYTES)
        else:
            model, inline_bytes = onnx.load(str(path), load_external_data=False), 0
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise ModelLoadError(
            f"{path}: not an ONNX model (protobuf parse failed: {_first_line(exc)}); the file may be truncated"
        ) from exc
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise ModelLoadError(
            f"{path}: not an ONNX model (no graph found); the file may be truncated or of another kind"
        )
    map_weights = mapped if mapped is not None else _external_bytes(model) + inline_bytes >= threshold
    if _uses_external(model) and map_weights:
        try:
            map_external_data(model, path.parent)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: {_first_line(exc)}; keep the .data file beside the model") from exc
    elif _uses_external(model):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # noqa: BLE001 - onnx raises OSError, ValueError or ValidationError
            raise ModelLoadError(
                f"{path}: external data could not be read ({_first_line(exc)}); keep the .data file beside the model"
            ) from exc
    if inline:  # after the external references: map_external_data wants relative locations only
        map_inline_data(model, path, inline, mapped=map_weights)
    for tensor in model.graph.initializer:  # reading external data sets it: the same bytes either way
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    opset = default_opset(model)
    # The probe (a few sessions) only when it can matter: it never answers below MAX_EMIT_OPSET.
    limit = ort_max_opset() if opset > MAX_EMIT_OPSET else MAX_EMIT_OPSET
    if opset > limit:
        import onnxruntime

        raise ModelLoadError(
            f"{path}: opset {opset} is newer than onnxruntime {onnxruntime.__version__} supports "
            f"(max {limit}); re-export the model with opset <= {MAX_EMIT_OPSET}"
        )
    if check:
        try:
            check_model(model, file=None if _uses_external(model) else path)
        except ValidationError as exc:
            repaired, notes = repair_declared_shapes(model)
            if not notes:
                raise ModelLoadError(f"{path}: fails onnx.checker: {exc}; fix or re-export the model") from exc
            for note in notes:
                log.warning("%s: %s", path, note)
            model = repaired
    return model


def _shape_of(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """Declared dims (None for symbolic/unknown), or None when no shape is declared."""
    t = value.type.tensor_type
    if value.type.WhichOneof("value") != "tensor_type" or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _agree(declared: list[int | None] | None, inferred: list[int | None] | None) -> bool:
    if declared is None or inferred is None:
        return True
    return len(declared) == len(inferred) and all(
        a is None or b is None or a == b for a, b in zip(declared, inferred, strict=True)
    )


def _strict_ok(model: onnx.ModelProto) -> bool:
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        return False
    return True


def repair_declared_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Drop declared output shapes / value_info that contradict shape inference (the model's error).

    Exporters sometimes write a stale shape (a value_info from before a graph edit, an output
    declared with the wrong size); onnxruntime only warns, but onnx's checker and version
    converter reject the model. Returns ``(model, [])`` when nothing contradicts inference (or
    the inference error has another cause), else a repaired copy and one note per dropped shape.
    """
    if not fits_protobuf(model) or _strict_ok(model):
        return model, []
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    for value in bare.graph.output:
        value.type.tensor_type.ClearField("shape")
    if not _strict_ok(bare):
        return model, []  # something else is wrong: the checker's message says what
    inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=False).graph
    found = {v.name: _shape_of(v) for v in [*inferred.value_info, *inferred.output]}
    repaired = onnx.ModelProto()
    repaired.CopyFrom(model)
    notes = []
    for value in repaired.graph.output:
        declared, actual = _shape_of(value), found.get(value.name)
        if not _agree(declared, actual):
            # onnxruntime wants a shape on graph outputs: the computed one, unknown dims where it has none
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in actual or []:
                dim = dims.add()
                if size is not None:
                    dim.dim_value = size
            notes.append(
                f"output {value.name!r} is declared with shape {declared} but the graph computes {actual}: "
                "dropped the declared shape for the computed one (the model's export is stale)"
            )
    kept = []
    for value in repaired.graph.value_info:
        declared, actual = _shape_of(value), found.get(value.name)
        if _agree(declared, actual):
            kept.append(value)
        else:
            notes.append(
                f"value_info of {value.name!r} says shape {declared} but the graph computes {actual}: "
                "dropped it (the model's export is stale)"
            )
    del repaired.graph.value_info[:]
    repaired.graph.value_info.extend(kept)
    if not notes or not _strict_ok(repaired):
        return model, []
    return repaired, notes


def _uses_external(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(model)  # noqa: SLF001
    )


def _external_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in onnx.external_data_helper._get_all_tensors(model):  # noqa: SLF001
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    return total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def check_model(model: onnx.ModelProto, file: Path | None = None, serialized: bytes | None = None) -> None:
    """onnx.checker (with full_check); large models are checked through a temporary file.

    ``file`` (the file ``model`` was read from unchanged, without external data) or ``serialized``
    (``model``'s bytes) are checked instead: no second serialisation of a model-sized message.
    """
    try:
        if file is not None:
            onnx.checker.check_model(str(file), full_check=True)
        elif serialized is not None:
            onnx.checker.check_model(serialized, full_check=True)
        elif is_mapped(model):  # the checker wants relative locations of files beside the model
            with tempfile.TemporaryDirectory(prefix="onnxcomp-check-") as tmp:
                onnx.checker.check_model(str(checkable_file(model, Path(tmp))), full_check=True)
        elif fits_protobuf(model):
            onnx.checker.check_model(model, full_check=True)
        else:
            with tempfile.TemporaryDirectory(prefix="onnxcomp-check-") as tmp:
                p = Path(tmp) / "model.onnx"
                write_model_file(model, p, external=True)
                onnx.checker.check_model(str(p), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValidationError(_first_line(exc)) from exc


#: Tensor types that are valid ONNX but that onnxruntime's CPU provider cannot run
#: (docs/onnxruntime.md): models using them are validated with onnx.reference instead.
NOT_RUNNABLE_ON_ORT = (onnx.TensorProto.FLOAT4E2M1,)


def runs_on_ort(model: onnx.ModelProto) -> bool:
    """False when the model stores a tensor type ORT's CPU provider has no kernel for."""
    return not any(t.data_type in NOT_RUNNABLE_ON_ORT for t in model.graph.initializer)


def serialize_model(model: onnx.ModelProto) -> bytes | None:
    """``model``'s bytes exactly as :func:`save_model` writes them, or None when it is written with
    external data (2 GiB and more, or mapped weights). Validation, the checker and saving share them."""
    if is_mapped(model) or not fits_protobuf(model):
        return None
    return model.SerializeToString(deterministic=True)


def validate_model(  # noqa: ANN201 - InferenceSession | None
    model: onnx.ModelProto, serialized: bytes | None = None, file: Path | None = None
):
    """onnx.checker plus an onnxruntime session at ORT_ENABLE_ALL; one-line ValidationError on failure.

    Returns the session (the manager runs it once on a sample: some fused kernels check their
    parameters only when they first run), or None for models with types ORT cannot run
    (FLOAT4E2M1), which ``onnx.reference`` loads instead. ``serialized`` (:func:`serialize_model`)
    spares both the checker and onnxruntime a serialisation of their own; ``file`` (those bytes
    written to a file, nothing beside it) is read by both instead: no bytes object held meanwhile.
    """
    check_model(model, file=file, serialized=serialized)
    if not runs_on_ort(model):
        from onnx.reference import ReferenceEvaluator

        try:
            ReferenceEvaluator(materialized(model))
        except Exception as exc:  # noqa: BLE001
            raise ValidationError(f"onnx.reference cannot load it: {_first_line(exc)}") from exc
        return None
    try:
        return ort_session(file if file is not None else model if serialized is None else serialized, level="all")
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise ValidationError(f"onnxruntime cannot load it: {_first_line(exc)}") from exc


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    external_data: bool | None = None,
    overwrite: bool = False,
    serialized: bytes | None = None,
    check: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write ``model`` atomically; returns the files written (model first).

    ``external_data=None`` chooses external data only when the model would not fit in one
    protobuf (>= 2 GB). Existing files are replaced only with ``overwrite=True``. ``serialized``
    (:func:`serialize_model` of ``model``, from its validation) is written as is when the model
    goes in one file. ``check`` runs on the written file (its data beside it) before it replaces
    anything at ``path``: what it raises leaves no output (``RunReport.check_written``).
    """
    path = Path(path)
    if external_data is not None:
        external = external_data
    elif is_mapped(model):  # the mapped weights are copied into the file in chunks (ir.inline_data)
        external = model.ByteSize() + mapped_bytes(model) >= PROTOBUF_LIMIT
    else:
        external = not fits_protobuf(model) if serialized is None else False
    targets = [path, path.with_name(path.name + ".data")] if external else [path]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise OnnxCompError(f"{target}: already exists; choose another output path or pass --force")
    if not path.parent.exists():
        raise OnnxCompError(f"{path.parent}: output directory does not exist; create it first")
    # save_model with external data mutates the proto (moves raw data out): work on a copy.
    if external and not is_mapped(model):  # the streaming writer copies only the header
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=path.parent))
    try:
        staged = tmpdir / path.name
        if serialized is not None and not external:
            staged.write_bytes(serialized)
        else:
            write_model_file(model, staged, external)
        if check is not None:
            check(staged)
        written = []
        # Data before model: a reader never sees a model whose data file is missing.
        for target in reversed(targets):
            os.replace(tmpdir / target.name, target)
            written.append(target)
        return list(reversed(written))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write a small text artefact (recipe, record, report) atomically, replacing any old one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".onnxcomp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path
