"""Calibration data: read, check against the model and stream ``{input name: array}`` batches.

Accepted forms of ``data`` (the first axis of every array indexes samples):

* a path to an ``.npz`` file holding one array per model input, named after that input;
* a path to a directory: its ``.npz`` files (each like the above) and, for a single-input
  model only, its ``.npy`` files (each one array of samples for that input), read in sorted
  name order, one file at a time (``.npy`` files are memory-mapped). Other files are ignored;
* a path to one ``.npy`` file (single-input models);
* in memory: a dict of full arrays (like a loaded ``.npz``), a bare array (single-input
  models), a list or any re-iterable of ``{input name: array}`` dicts (each one batch), a
  zero-argument callable returning such an iterable, or a one-shot iterator/generator of such
  dicts, which supports exactly one pass (a second pass raises :class:`CalibrationError`).

Batches hold at most ``batch_size`` samples (larger arrays and batches are re-sliced, smaller
ones are not merged); a model whose inputs have a fixed batch dimension gets batches of
exactly that size. ``max_samples`` bounds the samples used. Every batch is a fresh copy in
the model's dtype: float data converts to the model's float type, integer/bool data only to
an integer type that holds it safely; anything else is an error.

Everything is validated before any pass runs, by one streaming pass over the data at
construction (a one-shot iterator only has its first batch checked up front, the rest as it
streams). Errors are one line naming the input, the file or batch and the 0-based sample.
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
from onnx import helper

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
class _Input:
    name: str
    dtype: np.dtype[Any] | None  # None: element type unknown, accept as is
    dims: tuple[int | str | None, ...] | None  # None: unknown rank; str/None: any size

    def shape_text(self, start: int = 0) -> str:
        return _fmt((d if d is not None else "?") for d in (self.dims or ())[start:])


def _fmt(dims: Iterable[object]) -> str:
    items = [str(d) for d in dims]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _is_float(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)  # ml_dtypes floats


def _model_inputs(model: onnx.ModelProto) -> dict[str, _Input]:
    initializers = {t.name for t in model.graph.initializer}
    inputs: dict[str, _Input] = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        if not vi.type.HasField("tensor_type"):
            raise CalibrationError(f"model input {vi.name!r} is not a tensor; calibration data can only feed tensors")
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        inputs[vi.name] = _Input(vi.name, dtype, dims)
    if not inputs:
        raise CalibrationError("the model has no inputs (other than initializers) to feed calibration data to")
    return inputs


def _check_set(label: str, arrays: Any, inputs: Mapping[str, _Input]) -> tuple[dict[str, np.ndarray], int]:
    """Check one set's names, ranks, fixed dims, dtype kinds and sample counts (no conversion)."""
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
        if arr.ndim == 0:
            raise CalibrationError(f"input {name!r}: data in {label} is a scalar; its first axis must index samples")
        if spec.dims is not None:
            if arr.ndim != len(spec.dims):
                raise CalibrationError(
                    f"input {name!r}: data in {label} has rank {arr.ndim} (shape {_fmt(arr.shape)}) "
                    f"but the model expects rank {len(spec.dims)} {spec.shape_text()}"
                )
            for axis, want in enumerate(spec.dims[1:], start=1):
                if isinstance(want, int) and arr.shape[axis] != want:
                    raise CalibrationError(
                        f"input {name!r}: sample shape {_fmt(arr.shape[1:])} does not match the model's "
                        f"{spec.shape_text(1)} at axis {axis} in {label}"
                    )
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
    counts = {name: arr.shape[0] for name, arr in out.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{n!r} has {c}" for n, c in counts.items())
        raise CalibrationError(f"calibration data in {label} has different sample counts per input: {detail}")
    return out, next(iter(counts.values()))


def _convert(name: str, chunk: np.ndarray, spec: _Input, start: int, label: str) -> np.ndarray:
    """A fresh copy of ``chunk`` in the model's dtype, checked finite (``start``: its first sample's index)."""
    target = spec.dtype if spec.dtype is not None else chunk.dtype
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.array(chunk, dtype=target, copy=True)
        if not _is_float(out.dtype):
            return out
        flat = out.reshape(len(out), int(np.prod(out.shape[1:])))
        finite = np.isfinite(flat if flat.dtype.kind == "f" else flat.astype(np.float32)).all(axis=1)
    if finite.all():
        return out
    row = int(np.flatnonzero(~finite)[0])
    was_finite = not _is_float(chunk.dtype) or bool(np.isfinite(np.asarray(chunk[row], dtype=np.float64)).all())
    what = f"values outside the {target} range" if was_finite else "NaN/Inf"
    raise CalibrationError(f"calibration data for input {name!r} has {what} in sample {start + row} of {label}")


def _stream(
    sets: Iterable[_Set], inputs: Mapping[str, _Input], batch: int, exact: bool, limit: int | None, desc: str
) -> Iterator[Batch]:
    """Validated, converted batches of at most ``batch`` samples (exactly ``batch`` if ``exact``)."""
    used = 0
    it = iter(sets)
    while limit is None or used < limit:
        item = next(it, None)
        if item is None:
            break
        label, load = item
        arrays, n = _check_set(label, load(), inputs)
        if exact and n % batch:
            raise CalibrationError(
                f"the model's inputs have a fixed batch size of {batch} but {label} holds {n} "
                f"samples, not a multiple of {batch}"
            )
        for start in range(0, n, batch):
            stop = min(n, start + batch) if limit is None else min(n, start + batch, start + limit - used)
            if stop <= start:
                break
            yield {k: _convert(k, a[start:stop], inputs[k], start, label) for k, a in arrays.items()}
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


def _file_sets(path: Path, inputs: Mapping[str, _Input]) -> tuple[Callable[[], Iterator[_Set]], str, str]:
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
    data: CalibrationData, model: onnx.ModelProto, batch_size: int = 16, max_samples: int | None = None
) -> tuple[Factory, str]:
    """``(factory, name)``: ``factory()`` returns a fresh iterator of validated batches; ``name`` describes the data.

    See the module docstring for the accepted forms of ``data``. Raises :class:`CalibrationError`.
    """
    if batch_size < 1:
        raise CalibrationError(f"calibration batch size must be a positive integer, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise CalibrationError(f"the number of calibration samples must be a positive integer, got {max_samples}")
    inputs = _model_inputs(model)
    fixed = {s.dims[0] for s in inputs.values() if s.dims and isinstance(s.dims[0], int) and s.dims[0] > 0}
    if len(fixed) > 1:
        raise CalibrationError(
            f"the model's inputs have different fixed batch sizes {sorted(fixed)}; cannot batch calibration data"
        )
    exact = bool(fixed)
    batch = fixed.pop() if fixed else batch_size
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
            return _one_shot(iter(data), inputs, batch, exact, limit)
    else:
        raise CalibrationError(
            f"unsupported calibration data of type {type(data).__name__}; expected a path, "
            "a dict of arrays, an iterable of {input name: array} dicts or a callable returning one"
        )

    def factory() -> Iterator[Batch]:
        return _stream(sets(), inputs, batch, exact, limit, desc)

    total = sum(len(next(iter(b.values()))) for b in factory())  # the validation pass
    head = "first " if max_samples is not None and total == limit else ""
    return factory, f"{desc} ({detail}{head}{total} sample{'s' if total != 1 else ''})"


def _one_shot(
    data: Iterator[Any], inputs: Mapping[str, _Input], batch: int, exact: bool, limit: int | None
) -> tuple[Factory, str]:
    """A one-shot iterator: check its first batch now, stream the rest once, refuse a second pass."""
    desc = "one-shot iterator of batches"
    first = next(data, None)
    if first is None:
        raise CalibrationError(f"calibration data is empty: {desc} yielded nothing")
    arrays, _ = _check_set("batch 0", first, inputs)
    for name, arr in arrays.items():
        _convert(name, arr, inputs[name], 0, "batch 0")
    used = False

    def factory() -> Iterator[Batch]:
        nonlocal used
        if used:
            raise CalibrationError(
                "calibration data is a one-shot iterator and was already consumed; "
                "pass a list or a callable returning a fresh iterator"
            )
        used = True
        return _stream(_batches(itertools.chain([first], data)), inputs, batch, exact, limit, desc)

    return factory, f"{desc} (single pass)"
