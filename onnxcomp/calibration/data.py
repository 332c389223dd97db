"""Calibration data: read, check against the model and stream ``{input name: array}`` batches.

Accepted forms of ``data`` (arrays stack samples along each input's *sample axis*, below):

* a path to an ``.npz`` file holding one array per model input, named after that input;
* a path to a directory: its ``.npz`` files (each like the above) and, for a single-input
  model only, its ``.npy`` files (each one array of samples for that input), read in sorted
  name order, one file at a time (``.npy`` files are memory-mapped). Other files are ignored;
* a path to one ``.npy`` file (single-input models);
* in memory: a dict of full arrays (like a loaded ``.npz``), a bare array (single-input
  models), a list or any re-iterable of ``{input name: array}`` dicts (each one batch), a
  zero-argument callable returning such an iterable, or a one-shot iterator/generator of such
  dicts, which supports exactly one pass (a second pass raises :class:`CalibrationError`).

The sample axis of each input comes from the model's symbolic dims (``calibration.layouts``):
axis 0 for ordinary inputs, the axis of the batch symbol for inputs such as an RNN state
``[2, B, 128]`` (its arrays are ``(2, samples, 128)``), and none for scalars and fixed-shape
inputs that share no dim with the batch: those are given once per file/dict/batch, in the
model's shape, and reused for every batch. ``batch_axis={"state": 1, "sr": None}`` (CLI
``--batch-axis state=1 --batch-axis sr=none``) overrides it. An array whose samples sit on
another axis is rejected (with the ``np.moveaxis`` that fixes it), never silently scrambled.

Batches hold at most ``batch_size`` samples (larger arrays and batches are re-sliced, smaller
ones are not merged); a model whose inputs have a fixed batch dimension gets batches of
exactly that size. ``max_samples`` bounds the samples used. Every batch is a fresh copy in
the model's dtype: float data converts to the model's float type, integer/bool data only to
an integer type that holds it safely; anything else is an error.

Everything is validated before any pass runs, by one streaming pass over the data at
construction (a one-shot iterator only has its first batch checked up front, the rest as it
streams). Errors are one line naming the input, the file or batch and the 0-based sample, and,
when an input's samples are not on axis 0, which axis was taken as its sample axis and why.
Graph inputs that are initializers need no data; symbolic or unknown dims accept any size.
"""

from __future__ import annotations

import functools
import itertools
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnx

from onnxcomp.calibration.layouts import (
    BatchAxis,
    ModelInput,
    SampleAxis,
    check_given_once,
    check_shape,
    model_inputs,
    sample_axes,
)
from onnxcomp.errors import CalibrationError

Batch: TypeAlias = dict[str, np.ndarray]
Factory: TypeAlias = Callable[[], Iterator[Batch]]
CalibrationData: TypeAlias = (
    str
    | os.PathLike[str]
    | np.ndarray
    | Mapping[str, Any]
    | Iterable[Mapping[str, Any]]
    | Callable[[], Iterable[Mapping[str, Any]]]
)
# A "set" is one file, dict or batch of arrays with the same sample count: (label, loader).
_Set: TypeAlias = tuple[str, Callable[[], Any]]
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


@dataclass(frozen=True)
class _Feeds:
    """The inputs that take data, each one's sample axis, and whether errors must explain the axes."""

    inputs: dict[str, ModelInput]
    layouts: dict[str, SampleAxis]

    @property
    def explain(self) -> bool:
        """Errors say which axis was taken and why once any input does not sample along axis 0."""
        return any(layout.axis != 0 for layout in self.layouts.values())

    def count(self, arrays: Mapping[str, np.ndarray]) -> int:
        """Samples in a checked set or batch (1 when no input has a sample axis: the set is one batch)."""
        for name, layout in self.layouts.items():
            if layout.axis is not None:
                return int(arrays[name].shape[layout.axis])
        return 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _is_float(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)  # ml_dtypes floats


def _check_set(label: str, arrays: Any, feeds: _Feeds) -> tuple[dict[str, np.ndarray], int]:
    """Check one set's names, ranks, fixed dims, dtype kinds and sample counts (no conversion)."""
    inputs = feeds.inputs
    if not isinstance(arrays, Mapping):
        raise CalibrationError(
            f"calibration {label} is not a dict of {{input name: array}} (got {type(arrays).__name__})"
        )
    found = ", ".join(map(str, arrays)) or "none"
    for name in inputs:
        if name not in arrays:
            raise CalibrationError(
                f"calibration data has no array for model input {name!r} in {label}; arrays found: {found}"
            )
    extra = [str(k) for k in arrays if k not in inputs]
    if extra:
        raise CalibrationError(
            f"calibration data in {label} has arrays that are not model inputs: {', '.join(extra)}; "
            f"expected exactly: {', '.join(inputs)}"
        )
    out: dict[str, np.ndarray] = {}
    for name, spec in inputs.items():
        value = arrays[name]
        try:
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        except (ValueError, TypeError) as err:
            raise CalibrationError(f"input {name!r}: data in {label} is not an array ({_one_line(err)})") from err
        if arr.dtype.kind in "OUSM" or (arr.dtype.kind == "V" and not _is_float(arr.dtype)):
            raise CalibrationError(f"input {name!r}: data in {label} has non-numeric dtype {arr.dtype}")
        check_shape(arr, spec, feeds.layouts[name], feeds.explain, label)
        src, tgt = arr.dtype, spec.dtype
        if (
            tgt is not None
            and src != tgt
            and not (_is_float(tgt) and _is_float(src))
            and not (tgt.kind in "iub" and src.kind in "iub" and np.can_cast(src, tgt, "safe"))
        ):
            raise CalibrationError(
                f"input {name!r}: data in {label} has dtype {src} but the model expects {tgt}; convert it "
                "(float data converts to any float type, integer data only to a wider integer type)"
            )
        out[name] = arr
    counts = {n: (arr.shape[axis], axis) for n, arr in out.items() if (axis := feeds.layouts[n].axis) is not None}
    if len({c for c, _ in counts.values()}) > 1:
        if feeds.explain:
            detail = ", ".join(f"{n!r} has {c} (axis {a}: {feeds.layouts[n].reason})" for n, (c, a) in counts.items())
        else:
            detail = ", ".join(f"{n!r} has {c}" for n, (c, _) in counts.items())
        raise CalibrationError(f"calibration data in {label} has different sample counts per input: {detail}")
    samples = feeds.count(out)
    for name, arr in out.items():
        check_given_once(arr, inputs[name], feeds.layouts[name], samples, label)
    return out, samples


def _convert(name: str, chunk: np.ndarray, spec: ModelInput, axis: int | None, start: int, label: str) -> np.ndarray:
    """A fresh copy of ``chunk`` in the model's dtype, checked finite (``start``: its first sample's index)."""
    target = spec.dtype if spec.dtype is not None else chunk.dtype
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.array(chunk, dtype=target, copy=True)
        if not _is_float(out.dtype):
            return out
        samples = np.moveaxis(out, axis, 0) if axis is not None else out[None]
        flat = samples.reshape(len(samples), -1) if samples.size else samples.reshape(len(samples), 0)
        finite = np.isfinite(flat if flat.dtype.kind == "f" else flat.astype(np.float32)).all(axis=1)
    if finite.all():
        return out
    row = int(np.flatnonzero(~finite)[0])
    original = np.moveaxis(chunk, axis, 0)[row] if axis is not None else chunk
    was_finite = not _is_float(chunk.dtype) or bool(np.isfinite(np.asarray(original, dtype=np.float64)).all())
    what = f"values outside the {target} range" if was_finite else "NaN/Inf"
    where = f"sample {start + row} of {label}" if axis is not None else f"{label} (given once, no sample axis)"
    raise CalibrationError(f"calibration data for input {name!r} has {what} in {where}")


def _take(arr: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    return arr[(slice(None),) * axis + (slice(start, stop),)]


def _stream(
    sets: Iterable[_Set], feeds: _Feeds, batch: int, exact: bool, limit: int | None, desc: str
) -> Iterator[Batch]:
    """Validated, converted batches of at most ``batch`` samples (exactly ``batch`` if ``exact``)."""
    used = 0
    it = iter(sets)
    while limit is None or used < limit:
        item = next(it, None)
        if item is None:
            break
        label, load = item
        arrays, n = _check_set(label, load(), feeds)
        if exact and n % batch:
            raise CalibrationError(
                f"the model's inputs have a fixed batch size of {batch} but {label} holds {n} "
                f"samples, not a multiple of {batch}"
            )
        once = {  # inputs without a sample axis: converted once per set, a fresh copy in every batch
            k: _convert(k, a, feeds.inputs[k], None, 0, label)
            for k, a in arrays.items()
            if feeds.layouts[k].axis is None
        }
        for start in range(0, n, batch):
            stop = min(n, start + batch) if limit is None else min(n, start + batch, start + limit - used)
            if stop <= start:
                break
            out: Batch = {}
            for k, a in arrays.items():
                axis = feeds.layouts[k].axis
                if axis is None:
                    out[k] = once[k].copy()
                else:
                    out[k] = _convert(k, _take(a, axis, start, stop), feeds.inputs[k], axis, start, label)
            yield out
            used += stop - start
    if used == 0:
        raise CalibrationError(f"calibration data is empty: {desc} has no samples")


def _load(path: Path, label: str, single: str | None) -> dict[str, np.ndarray]:
    """One file's arrays: an .npz read whole, or an .npy memory-mapped as the single input's samples."""
    npz = path.suffix.lower() == ".npz"
    try:
        loaded = np.load(path, mmap_mode=None if npz else "r", allow_pickle=False)
        if npz != isinstance(loaded, np.lib.npyio.NpzFile):
            raise CalibrationError(
                f"{label}: not an .npz archive (it holds a single array; name it .npy)"
                if npz
                else f"{label}: not an .npy array file (it is an .npz archive; name it .npz)"
            )
        if not npz:
            return {str(single): loaded}
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except _READ_ERRORS as err:
        raise CalibrationError(f"{label}: cannot read as {path.suffix.lower()}: {_one_line(err)}") from err


def _file_sets(path: Path, inputs: Mapping[str, ModelInput]) -> tuple[Callable[[], Iterator[_Set]], str, str]:
    """The sets of a file or directory, its description and details (file count)."""
    if not path.exists():
        raise CalibrationError(f"{path}: no such file or directory")
    single = next(iter(inputs)) if len(inputs) == 1 else None
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (".npz", ".npy")
        )
        if not files:
            raise CalibrationError(f"calibration data is empty: directory {path} has no .npz or .npy files")
        if single is None and any(p.suffix.lower() == ".npy" for p in files):
            raise CalibrationError(
                f"{path}: .npy files are only accepted for single-input models; this model has inputs "
                f"{', '.join(inputs)}: use .npz files with one array per input"
            )
        desc, detail = f"{path.name}/", f"{len(files)} file{'s' if len(files) > 1 else ''}, "
    elif path.suffix.lower() == ".npy" and single is None:
        raise CalibrationError(
            f"{path}: .npy files are only accepted for single-input models; use an .npz with arrays "
            f"named {', '.join(inputs)}"
        )
    elif path.suffix.lower() in (".npz", ".npy"):
        files, desc, detail = [path], path.name, ""
    else:
        raise CalibrationError(
            f"{path}: unsupported calibration file; expected an .npz, an .npy or a directory of them"
        )

    def sets() -> Iterator[_Set]:
        for p in files:
            label = f"{path.name}/{p.name}" if p is not path else p.name
            yield label, functools.partial(_load, p, label, single)

    return sets, desc, detail


def _batches(source: Iterable[Any]) -> Iterator[_Set]:
    for i, item in enumerate(source):
        yield f"batch {i}", functools.partial(_identity, item)


def _identity(item: Any) -> Any:
    return item


def _call(fn: Callable[[], Any]) -> Iterable[Any]:
    result = fn()
    if isinstance(result, Mapping):
        return [result]
    if not isinstance(result, Iterable):
        raise CalibrationError(
            f"calibration callable returned a {type(result).__name__}; expected an iterable of dicts"
        )
    return result


def calibration_source(
    data: CalibrationData,
    model: onnx.ModelProto,
    batch_size: int = 16,
    max_samples: int | None = None,
    batch_axis: BatchAxis | None = None,
) -> tuple[Factory, str]:
    """``(factory, name)``: ``factory()`` returns a fresh iterator of validated batches; ``name`` describes the data.

    See the module docstring for the accepted forms of ``data``; ``batch_axis`` overrides the
    sample axis of the named inputs (``None``: given once). Raises :class:`CalibrationError`.
    """
    if batch_size < 1:
        raise CalibrationError(f"calibration batch size must be a positive integer, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise CalibrationError(f"the number of calibration samples must be a positive integer, got {max_samples}")
    inputs = model_inputs(model)
    feeds = _Feeds(inputs, sample_axes(inputs, batch_axis))
    fixed = {
        name: size
        for name, layout in feeds.layouts.items()
        if layout.axis is not None
        and (dims := inputs[name].dims)
        and isinstance(size := dims[layout.axis], int)
        and size > 0
    }
    if len(set(fixed.values())) > 1:
        sizes = ", ".join(f"{n!r} has {s} at axis {feeds.layouts[n].axis}" for n, s in fixed.items())
        raise CalibrationError(
            f"the model's inputs have different fixed batch sizes ({sizes}); cannot batch calibration data: "
            "pass --batch-axis NAME=none for an input given once, or NAME=AXIS for its sample axis"
        )
    exact = bool(fixed)
    batch = next(iter(fixed.values())) if fixed else batch_size
    limit = max_samples
    if exact and limit is not None:
        limit = limit // batch * batch
        if limit == 0:
            raise CalibrationError(
                f"{max_samples} calibration samples are fewer than the model's fixed batch size of {batch}"
            )

    sets: Callable[[], Iterable[_Set]]
    detail = ""
    if isinstance(data, (str, os.PathLike)):
        sets, desc, detail = _file_sets(Path(data), inputs)
    elif isinstance(data, np.ndarray):
        if len(inputs) != 1:
            raise CalibrationError(
                f"a bare array can only calibrate a single-input model; pass a dict keyed by {', '.join(inputs)}"
            )
        arrays = {next(iter(inputs)): data}
        sets, desc = (lambda: [("in-memory array", lambda: arrays)]), "in-memory array"
    elif isinstance(data, Mapping):
        sets, desc = (lambda: [("in-memory arrays", lambda: data)]), "in-memory arrays"
    elif callable(data):
        name = getattr(data, "__qualname__", type(data).__name__)
        sets, desc = (lambda: _batches(_call(data))), f"batches from {name}()"
    elif isinstance(data, Iterable):
        if iter(data) is not data:  # re-iterable (list, tuple, custom container)
            sets, desc = (lambda: _batches(data)), "in-memory batches"
        else:
            return _one_shot(iter(data), feeds, batch, exact, limit)
    else:
        raise CalibrationError(
            f"unsupported calibration data of type {type(data).__name__}; expected a path, "
            "a dict of arrays, an iterable of {input name: array} dicts or a callable returning one"
        )

    def factory() -> Iterator[Batch]:
        return _stream(sets(), feeds, batch, exact, limit, desc)

    total = sum(feeds.count(b) for b in factory())  # the validation pass
    head = "first " if max_samples is not None and total == limit else ""
    return factory, f"{desc} ({detail}{head}{total} sample{'s' if total != 1 else ''})"


def _one_shot(data: Iterator[Any], feeds: _Feeds, batch: int, exact: bool, limit: int | None) -> tuple[Factory, str]:
    """A one-shot iterator: check its first batch now, stream the rest once, refuse a second pass."""
    desc = "one-shot iterator of batches"
    first = next(data, None)
    if first is None:
        raise CalibrationError(f"calibration data is empty: {desc} yielded nothing")
    arrays, _ = _check_set("batch 0", first, feeds)
    for name, arr in arrays.items():
        _convert(name, arr, feeds.inputs[name], feeds.layouts[name].axis, 0, "batch 0")
    used = False

    def factory() -> Iterator[Batch]:
        nonlocal used
        if used:
            raise CalibrationError(
                "calibration data is a one-shot iterator and was already consumed; "
                "pass a list or a callable returning a fresh iterator"
            )
        used = True
        return _stream(_batches(itertools.chain([first], data)), feeds, batch, exact, limit, desc)

    return factory, f"{desc} (single pass)"
