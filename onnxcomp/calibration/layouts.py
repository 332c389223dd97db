"""Which axis of each model input indexes calibration samples (its *sample axis*), and why.

Calibration arrays hold many samples stacked along one axis; the model's batch dimension is not
always axis 0 (an RNN state ``[2, B, 128]``) and some inputs have none at all (a scalar sample
rate, a fixed state): those are given once and fed unchanged with every batch.

The rule, from the model's declared dims (``batch_axis`` overrides it per input):

1. The *batch symbol*: the one symbolic dim whose name says batch (``batch``, ``batch_size``,
   ``N``, ``B``, ``bs``), else the symbol found at axis 0 of the most inputs (first input wins a tie).
2. Per input: a scalar has no sample axis; an input holding the batch symbol samples along its
   first occurrence; an input whose axis 0 is symbolic or unknown samples along axis 0. An input
   whose axis 0 is fixed, in a model whose batch is free (a batch symbol, or an input with an
   unknown axis 0), samples along its one unknown dim if it has exactly one (``[2, ?, 128]``
   beside ``[?, 576]``: exports without dim names) and otherwise has no sample axis (it shares
   no dim with the batch); in an all-fixed model it samples along axis 0 only when that size is
   the fixed batch of the first such input.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import onnx
from onnx import helper

from onnxcomp.errors import CalibrationError

Dim: TypeAlias = int | str | None  # str: a symbol; None: unknown
#: ``{input name: axis}`` overrides; ``None`` means "no sample axis: given once".
BatchAxis: TypeAlias = Mapping[str, int | None]


@dataclass(frozen=True)
class ModelInput:
    """A graph input that takes data: its element type and declared dims."""

    name: str
    dtype: np.dtype[Any] | None  # None: element type unknown, accept as is
    dims: tuple[Dim, ...] | None  # None: unknown rank

    def dims_text(self) -> str:
        if self.dims is None:
            return "[rank unknown]"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


@dataclass(frozen=True)
class SampleAxis:
    """Where an input's samples are stacked (``axis``; None: given once) and the reason it was chosen."""

    axis: int | None
    reason: str
    overridden: bool = False  # set by batch_axis: trusted, never second-guessed from the data


def model_inputs(model: onnx.ModelProto) -> dict[str, ModelInput]:
    """The graph inputs that need data (initializers listed as inputs do not), in graph order."""
    initializers = {t.name for t in model.graph.initializer}
    inputs: dict[str, ModelInput] = {}
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
        inputs[vi.name] = ModelInput(vi.name, dtype, dims)
    if not inputs:
        raise CalibrationError("the model has no inputs (other than initializers) to feed calibration data to")
    return inputs


def _says_batch(symbol: str) -> bool:
    low = symbol.lower()
    return "batch" in low or low in ("n", "b", "bs")


def _symbols(spec: ModelInput) -> Iterable[str]:
    return (d for d in spec.dims or () if isinstance(d, str))


def batch_symbol(inputs: Mapping[str, ModelInput]) -> tuple[str, str] | None:
    """``(symbol, input)``: the batch dim's symbol and the input that shows it as a batch, or None."""
    named = list(dict.fromkeys(s for spec in inputs.values() for s in _symbols(spec) if _says_batch(s)))
    leading = [spec.dims[0] for spec in inputs.values() if spec.dims and isinstance(spec.dims[0], str)]
    if len(named) == 1:
        symbol = named[0]
    elif leading:
        counts = Counter(leading)
        symbol = max(leading, key=lambda s: counts[s])  # max keeps the first of equal counts
    else:
        return None
    owner = next(
        (n for n, spec in inputs.items() if spec.dims and spec.dims[0] == symbol),
        next(n for n, spec in inputs.items() if symbol in _symbols(spec)),
    )
    return str(symbol), owner


def _checked_overrides(inputs: Mapping[str, ModelInput], overrides: BatchAxis) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name, axis in overrides.items():
        spec = inputs.get(name)
        if spec is None:
            raise CalibrationError(
                f"--batch-axis names {name!r}, which is not a model input that takes data; inputs: {', '.join(inputs)}"
            )
        if axis is None:
            out[name] = None
            continue
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise CalibrationError(f"--batch-axis {name}={axis!r}: the axis must be an integer or none")
        rank = None if spec.dims is None else len(spec.dims)
        if rank == 0 or (rank is not None and not -rank <= axis < rank) or (rank is None and axis < 0):
            allowed = (
                "none"
                if rank == 0
                else "a non-negative integer or none"
                if rank is None
                else f"-{rank}..{rank - 1} or none"
            )
            raise CalibrationError(
                f"--batch-axis {name}={axis}: input {name!r} {spec.dims_text()} has no axis {axis}; use {allowed}"
            )
        out[name] = int(axis) % rank if rank else int(axis)
    return out


def sample_axes(inputs: Mapping[str, ModelInput], overrides: BatchAxis | None = None) -> dict[str, SampleAxis]:
    """Each input's sample axis and why (see the module docstring); raises CalibrationError on a bad override."""
    chosen = _checked_overrides(inputs, overrides or {})
    found = batch_symbol(inputs)
    fixed_ref = next(
        ((n, s.dims[0]) for n, s in inputs.items() if n not in chosen and s.dims and isinstance(s.dims[0], int)),
        None,
    )
    free_0 = next((n for n, s in inputs.items() if s.dims and s.dims[0] is None), None)
    batch_text = (
        f"{found[0]!r}, the batch of {found[1]!r}"
        if found is not None
        else f"the unknown axis 0 of {free_0!r}"
        if free_0 is not None
        else ""
    )
    out: dict[str, SampleAxis] = {}
    for name, spec in inputs.items():
        dims = spec.dims
        if name in chosen:
            axis = chosen[name]
            out[name] = SampleAxis(axis, f"set by --batch-axis {name}={'none' if axis is None else axis}", True)
        elif dims is None:
            out[name] = SampleAxis(0, "rank unknown, so axis 0")
        elif not dims:
            out[name] = SampleAxis(None, "a scalar")
        elif found is not None and found[0] in dims:
            symbol, owner = found
            of = "" if owner == name else f" of {owner!r}"
            out[name] = SampleAxis(dims.index(symbol), f"dim {symbol!r} is the batch{of}")
        elif not isinstance(dims[0], int):
            out[name] = SampleAxis(0, f"axis 0 is {'unknown' if dims[0] is None else repr(dims[0])}, not fixed")
        elif batch_text:
            out[name] = _fixed_axis_0(dims, batch_text)
        elif fixed_ref is None or dims[0] == fixed_ref[1]:
            out[name] = SampleAxis(0, f"axis 0 is the model's fixed batch of {dims[0]}")
        else:
            ref, size = fixed_ref
            out[name] = SampleAxis(None, f"fixed dims, axis 0 ({dims[0]}) is not the fixed batch {size} of {ref!r}")
    return out


def _fixed_axis_0(dims: tuple[Dim, ...], batch_text: str) -> SampleAxis:
    """An input with a fixed axis 0 in a model whose batch is free: its one unknown dim, else none.

    Exports without dim names (``state [2, ?, 128]`` beside ``input [?, 576]``) leave the batch
    unknown; an input whose only free dim is unknown most likely carries the batch there.
    """
    unknown = [i for i, d in enumerate(dims) if d is None]
    if len(unknown) == 1 and not any(isinstance(d, str) for d in dims):
        return SampleAxis(unknown[0], f"axis 0 is fixed; its one unknown dim stands for the batch, {batch_text}")
    if all(isinstance(d, int) for d in dims):
        return SampleAxis(None, f"fixed dims, none of them {batch_text}")
    return SampleAxis(None, f"axis 0 is fixed and no dim is {batch_text}")


def describe(spec: ModelInput, layout: SampleAxis) -> str:
    """``input 'state' [2, B, 128]: sample axis 1 (dim 'B' is the batch of 'input')``, for error messages."""
    head = f"input {spec.name!r} {spec.dims_text()}"
    if layout.axis is None:
        return f"{head}: no sample axis ({layout.reason}: given once and reused for every batch)"
    return f"{head}: sample axis {layout.axis} ({layout.reason})"


def moved_axis_hint(shape: tuple[int, ...], spec: ModelInput, axis: int) -> str:
    """If moving one axis of ``shape`` to ``axis`` fits the fixed dims, how to fix the array; else ''."""
    if spec.dims is None or len(shape) != len(spec.dims):
        return ""
    for source in range(len(shape)):
        if source == axis:
            continue
        moved = list(shape)
        moved.insert(axis, moved.pop(source))
        if all(not isinstance(d, int) or i == axis or d == moved[i] for i, d in enumerate(spec.dims)):
            return (
                f"; its samples look stacked on axis {source}: store np.moveaxis(array, {source}, {axis}) "
                f"(shape {_fmt(moved)})"
            )
    return ""


def check_shape(arr: np.ndarray, spec: ModelInput, layout: SampleAxis, explain: bool, label: str) -> None:
    """The array's rank and fixed dims against the model, the sample axis excepted.

    ``explain``: say which axis was taken as the sample axis and why (once any input of the model
    samples along another axis than 0; otherwise the plain messages of the axis-0 convention).
    """
    name, axis = spec.name, layout.axis
    if not explain:
        if arr.ndim == 0:
            raise CalibrationError(f"input {name!r}: data in {label} is a scalar; its first axis must index samples")
        if spec.dims is not None and arr.ndim != len(spec.dims):
            raise CalibrationError(
                f"input {name!r}: data in {label} has rank {arr.ndim} (shape {_fmt(arr.shape)}) "
                f"but the model expects rank {len(spec.dims)} {_fmt('?' if d is None else d for d in spec.dims)}"
            )
        for i, want in enumerate((spec.dims or ())[1:], start=1):
            if isinstance(want, int) and arr.shape[i] != want:
                sample = _fmt("?" if d is None else d for d in (spec.dims or ())[1:])
                raise CalibrationError(
                    f"input {name!r}: sample shape {_fmt(arr.shape[1:])} does not match the model's "
                    f"{sample} at axis {i} in {label}"
                )
        return
    what = f"{describe(spec, layout)}; the array in {label} has shape {_fmt(arr.shape)}"
    if spec.dims is None:
        if axis is not None and arr.ndim <= axis:
            raise CalibrationError(f"{what}, which has no axis {axis}")
        return
    if arr.ndim != len(spec.dims):
        once = axis is None and arr.ndim == len(spec.dims) + 1
        fix = ": give it once, in the model's shape, not one per sample" if once else ""
        raise CalibrationError(f"{what}, rank {arr.ndim} instead of {len(spec.dims)}{fix}")
    for i, want in enumerate(spec.dims):
        if i != axis and isinstance(want, int) and arr.shape[i] != want:
            hint = (
                moved_axis_hint(arr.shape, spec, axis)
                if axis is not None
                else f"; if axis {i} holds one entry per sample, pass --batch-axis {name}={i}"
            )
            raise CalibrationError(f"{what}, which does not match the model at axis {i} (expects {want}){hint}")


def _fmt(dims: Iterable[object]) -> str:
    items = [str(d) for d in dims]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def check_given_once(arr: np.ndarray, spec: ModelInput, layout: SampleAxis, samples: int, label: str) -> None:
    """Refuse to guess when an input given once has a free dim exactly as long as the others' samples.

    Exports often name each input's batch dim differently (``unk__0``, ``unk__1``), so a state
    ``[2, unk__1, 128]`` looks batch-free; feeding its per-sample array whole would pair every batch
    with all the states. Ask for ``--batch-axis`` instead (an explicit ``NAME=none`` is trusted).
    """
    if layout.axis is not None or layout.overridden or spec.dims is None or samples < 2:
        return
    for i, dim in enumerate(spec.dims):
        if not isinstance(dim, int) and arr.shape[i] == samples:
            raise CalibrationError(
                f"{describe(spec, layout)}; its array in {label} has shape {_fmt(arr.shape)}, as long at axis {i} "
                f"as the {samples} samples of the other inputs: pass --batch-axis {spec.name}={i} if axis {i} "
                f"indexes samples, or --batch-axis {spec.name}=none if the whole array goes with every batch"
            )
