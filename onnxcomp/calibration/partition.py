"""Calibration in groups of tensors when exposing all of them for one batch would not fit in memory.

onnxruntime keeps every graph output of a run alive until the run returns (and fetching a subset
does not release the others), so the tensors exposed for calibration cost their full size per
batch. When their estimated total exceeds the budget, the calibrator makes one session per group
of tensors and passes over the data once per group; each observer still sees every batch in
order, so the result is the all-at-once result exactly.

Sizes are estimated from shapes: ONNX shape inference on a copy of the graph without weight data,
with each symbolic dim of the model's inputs resolved from the first batch. A tensor whose shape
stays unknown is counted as large as the largest known one (the estimate errs towards smaller
groups). Data given as a one-shot iterator is spooled to a temporary directory during the first
group's pass and replayed from there for the others.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

_SKELETON_LIMIT = 1024  # initializers above this many bytes lose their data in the shape copy
_DEFAULT_SHARE = 4  # the default budget: a quarter of the machine's physical memory
# np.savez takes arrays by name; its stub types **kwds as its own options
_savez: Callable[..., None] = np.savez


def machine_budget() -> int:
    """The default budget of exposed tensors per batch: a quarter of physical memory (bytes)."""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX: assume 8 GB
        return (8 << 30) // _DEFAULT_SHARE
    return max(1, pages * page // _DEFAULT_SHARE)


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without large weight data (shape inference needs dims, and values of small shape constants)."""
    copy = onnx.ModelProto()
    _copy_without_graph(model, copy)
    for init in model.graph.initializer:
        kept = copy.graph.initializer.add()
        if init.data_location == onnx.TensorProto.EXTERNAL or len(init.raw_data) > _SKELETON_LIMIT:
            kept.name, kept.data_type = init.name, init.data_type
            kept.dims.extend(init.dims)
        else:
            kept.CopyFrom(init)
    return copy


def _copy_without_graph(model: onnx.ModelProto, copy: onnx.ModelProto) -> None:
    """Copy everything shape inference reads but the initializers (left for :func:`_skeleton`): no weight copy."""
    copy.ir_version = model.ir_version
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    graph = copy.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)


def estimate_bytes(model: onnx.ModelProto, names: Sequence[str], batch: Mapping[str, Any]) -> dict[str, int | None]:
    """Estimated bytes of each named tensor for ``batch`` (None: shape unknown)."""
    symbols: dict[str, int] = {}
    for value in model.graph.input:
        arr = batch.get(value.name)
        if arr is None:
            continue
        shape = np.shape(arr)
        dims = value.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            for dim, size in zip(dims, shape, strict=True):
                if dim.dim_param:
                    symbols.setdefault(dim.dim_param, int(size))
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model), data_prop=True).graph
    except Exception:  # noqa: BLE001 - inference fails on some custom ops: every size is unknown then
        return dict.fromkeys(names)
    infos = {v.name: v for v in [*inferred.value_info, *inferred.output, *inferred.input]}
    sizes: dict[str, int | None] = {}
    for name in names:
        sizes[name] = _size(infos.get(name), symbols)
    return sizes


def _size(info: onnx.ValueInfoProto | None, symbols: Mapping[str, int]) -> int | None:
    if info is None or not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return None
    elem = info.type.tensor_type.elem_type
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    count = 1
    for dim in info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            count *= dim.dim_value
        elif dim.dim_param in symbols:
            count *= symbols[dim.dim_param]
        else:
            return None
    return count * itemsize


def group_tensors(names: Sequence[str], sizes: Mapping[str, int | None], budget: int) -> list[tuple[str, ...]]:
    """Consecutive groups of ``names`` whose estimated bytes stay within ``budget``.

    A tensor larger than the budget on its own gets a group of its own (it cannot be split here).
    """
    known = [s for s in sizes.values() if s is not None]
    unknown_as = max(known) if known else budget  # unknown: as large as the largest known
    groups: list[tuple[str, ...]] = []
    current: list[str] = []
    used = 0
    for name in names:
        size = sizes.get(name)
        cost = unknown_as if size is None else size
        if current and used + cost > budget:
            groups.append(tuple(current))
            current, used = [], 0
        current.append(name)
        used += cost
    if current:
        groups.append(tuple(current))
    return groups


class Spool:
    """Replays a one-shot stream of batches: recorded to a temporary directory while first read."""

    def __init__(self, stream: Iterable[Any]) -> None:
        self._stream = stream
        self._dir = tempfile.TemporaryDirectory(prefix="onnxcomp-spool-")
        self._count = 0

    def record(self) -> Iterator[Any]:
        """The stream itself, each batch saved as it passes (the first pass)."""
        for batch in self._stream:
            if isinstance(batch, Mapping):
                arrays = {str(k): np.asarray(v) for k, v in batch.items()}
                _savez(Path(self._dir.name, f"{self._count}.npz"), **arrays)
            self._count += 1
            yield batch

    def replay(self) -> Iterator[dict[str, np.ndarray]]:
        """The recorded batches again, in order (read one at a time)."""
        for index in range(self._count):
            with np.load(Path(self._dir.name, f"{index}.npz"), allow_pickle=False) as data:
                yield {k: data[k] for k in data.files}

    def close(self) -> None:
        self._dir.cleanup()
