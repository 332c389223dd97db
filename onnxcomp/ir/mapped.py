"""Weights that stay on disk: the big initializers of a model read through memory maps.

A model loaded *mapped* (``model_io.load_model`` when its weights reach
``model_io.MAP_WEIGHTS_FROM_BYTES``, and a run writing a model from
``execute.RUN_MAP_WEIGHTS_FROM_BYTES``) holds no weight bytes: each large initializer of the main
graph with a numpy dtype stays an external reference whose ``location`` is the **absolute** path
of its data file (small and non-numpy tensors are read into the proto: shape inference and
constant folding read them). Absolute locations are this in-memory form only; every file
written from a mapped model (:func:`write_streaming`) or handed to onnx (:func:`checkable_file`,
:func:`detach_mapped`) or onnxruntime (:func:`relative_copy`) gets relative ones.

In the graph a mapped constant is a :class:`MappedValues` (gs ``LazyValues``): reading its
values gives a read-only :class:`SourceArray` (``np.memmap``: pages come from the file as they
are read; a write raises instead of silently diverging from the file). :func:`release_mapped`
(run by every ``ir.export_model``) turns an unchanged SourceArray back into the reference, so an
export copies no weight and the map is closed (its pages leave the process). A pass that
replaces a constant's values exports them as usual.

New big weights of a run that writes a mapped model to a file go to a spill file as they are
made and are mapped from there like the source's own (:mod:`onnxcomp.ir.spill`); sessions take
tensors mapped from another folder than the source's from memory maps (:func:`split_in_memory`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper as edh

#: Tensors smaller than this are read into the proto (shape inference and folding read them).
MIN_MAPPED_BYTES = 1 << 16

#: Offsets of tensors written to a data file are multiples of this (the page size: onnxruntime
#: can map them).
ALIGNMENT = 4096

#: Tensors written from memory below this size stay in the model file (onnx's own default).
INLINE_BYTES = 1024

_COPY_CHUNK = 16 << 20


class SourceArray(np.memmap):
    """A read-only map of one initializer's bytes; ``source`` is its external reference (None on views)."""

    source: onnx.TensorProto | None = None

    def __array_finalize__(self, obj: object) -> None:
        super().__array_finalize__(obj)
        self.source = None  # a view or a result is not the initializer itself


class MappedValues(gs.ir.tensor.LazyValues):
    """gs lazy values of a mapped initializer: loading maps the file instead of reading it."""

    def load(self) -> np.ndarray:
        return map_array(self.tensor)


def _info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def numpy_dtype(tensor: onnx.TensorProto) -> np.dtype | None:
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        return None
    return dtype if dtype.kind in "fiub" and dtype.names is None and dtype.metadata is None else None


def mappable(tensor: onnx.TensorProto, length: int) -> bool:
    """Whether ``length`` bytes, MIN_MAPPED_BYTES or more, are all of ``tensor``'s values in a numpy
    dtype: what is left in a file (or moved to one) and read back through a map."""
    dtype = numpy_dtype(tensor)
    whole = dtype is not None and length == int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
    return whole and length >= MIN_MAPPED_BYTES


def set_reference(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` an external reference (onnx's setter insists on raw data being present)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def source_of(tensor: onnx.TensorProto) -> tuple[str, int, int] | None:
    """(absolute data file, offset, length) of a mapped tensor, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = _info(tensor)
    location = info.get("location", "")
    if not os.path.isabs(location):
        return None
    return location, int(info.get("offset", 0)), int(info["length"])


#: A model with this many bytes of mapped weights is *large*: there memory comes before parity with
#: the in-memory path (sessions without prepacked weights, no local SQNR figures, a mapped
#: ``RunReport.model``); below it a mapped run does what an in-memory one does.
LARGE_MAPPED_BYTES = 1 << 30


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` has :data:`LARGE_MAPPED_BYTES` of mapped weights or more."""
    return mapped_bytes(model) >= LARGE_MAPPED_BYTES


def mapped_bytes(model: onnx.ModelProto) -> int:
    """The bytes of ``model``'s mapped initializers (left in their files)."""
    return sum(found[2] for t in model.graph.initializer if (found := source_of(t)) is not None)


def is_mapped(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds initializers mapped from their data files."""
    return any(source_of(t) is not None for t in model.graph.initializer)


def _resolve(tensor: onnx.TensorProto, base: Path) -> tuple[Path, int, int]:
    """The checked (file, offset, length) of an external tensor whose location is relative to ``base``."""
    info = _info(tensor)
    location = info.get("location", "")
    path = (base / location).resolve()
    if os.path.isabs(location) or base not in path.parents:
        raise ValueError(f"tensor {tensor.name!r}: external data location {location!r} is outside {base}")
    if not path.is_file():
        raise ValueError(f"tensor {tensor.name!r}: external data file {path} is missing")
    offset = int(info.get("offset", 0))
    size = path.stat().st_size
    length = int(info["length"]) if "length" in info else size - offset
    if offset + length > size:
        raise ValueError(f"tensor {tensor.name!r}: bytes {offset}..{offset + length} are past the end of {path}")
    return path, offset, length


def map_external_data(model: onnx.ModelProto, directory: Path) -> int:
    """Point the big external initializers of ``model`` at their absolute data files, read the rest.

    Returns the bytes left on disk. Raises ValueError (one line) for a location outside
    ``directory``, a missing data file or a tensor past the end of its file.
    """
    base = Path(directory).resolve()
    mapped = 0
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        path, offset, length = _resolve(tensor, base)
        if mappable(tensor, length):
            set_reference(tensor, str(path), offset, length)
            mapped += length
    # Everything else external (small, non-numpy, in bodies or attributes) is read into the proto.
    for tensor in edh._get_all_tensors(model):  # noqa: SLF001 - onnx's walk over every tensor
        if tensor.data_location == onnx.TensorProto.EXTERNAL and source_of(tensor) is None:
            path, offset, length = _resolve(tensor, base)
            with open(path, "rb") as fh:
                fh.seek(offset)
                tensor.raw_data = fh.read(length)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return mapped


def map_array(tensor: onnx.TensorProto) -> SourceArray:
    """The values of a mapped tensor as a read-only memory map."""
    found = source_of(tensor)
    dtype = numpy_dtype(tensor)
    if found is None or dtype is None:
        raise ValueError(f"tensor {tensor.name!r} is not a mapped initializer")
    path, offset, _ = found
    array = SourceArray(path, dtype=dtype.newbyteorder("<"), mode="r", offset=offset, shape=tuple(tensor.dims))
    array.source = tensor
    return array


def tensor_values(tensor: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` that also reads a mapped tensor (through a map, not a copy)."""
    if source_of(tensor) is not None:
        return map_array(tensor)
    return onnx.numpy_helper.to_array(tensor)


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when nothing is mapped, else a copy with every mapped initializer's bytes
    read in: for consumers that only take self-contained protos (onnx.reference, writers of their
    own layouts). Costs the mapped bytes in memory."""
    if not is_mapped(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if source_of(tensor) is not None:
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.asarray(map_array(tensor)), tensor.name))
    return copy


def map_constants(graph: gs.Graph) -> None:
    """Give each imported mapped constant of ``graph`` :class:`MappedValues` (gs would read the file)."""
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if not isinstance(values, gs.ir.tensor.LazyValues):
            continue
        if not isinstance(values, (MappedValues, gs.ir.tensor.SparseValues)):
            if source_of(values.tensor) is not None:
                tensor._values = MappedValues(values.tensor)  # noqa: SLF001 - gs has no setter that keeps laziness


def release_mapped(graph: gs.Graph) -> None:
    """Unchanged mapped values back to references (no copy on export; the maps close)."""
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(values, SourceArray) and values.source is not None:
            tensor._values = MappedValues(values.source)  # noqa: SLF001


def _data_directory(model: onnx.ModelProto) -> Path:
    """The folder most mapped bytes come from (the source model's; spilled weights live elsewhere)."""
    sizes: dict[Path, int] = {}
    for tensor in model.graph.initializer:
        found = source_of(tensor)
        if found is not None:
            folder = Path(found[0]).parent
            sizes[folder] = sizes.get(folder, 0) + found[2]
    if not sizes:
        raise ValueError("the model has no mapped initializers")
    return max(sizes, key=lambda folder: (sizes[folder], str(folder)))


def relative_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Path]:
    """A copy whose mapped locations in one folder (returned) are relative to it: what onnxruntime
    loads from bytes with ``session.model_external_initializers_file_folder_path``. Tensors mapped
    from other folders (spilled weights) keep absolute locations: :func:`split_in_memory` takes them."""
    folder = _data_directory(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        found = source_of(tensor)
        if found is not None and Path(found[0]).parent == folder:
            set_reference(tensor, Path(found[0]).name, found[1], found[2])
    return copy, folder


#: Location of the stubs :func:`split_in_memory` leaves in a session's copy (never read: onnxruntime
#: is given those initializers' values from memory).
IN_MEMORY_LOCATION = "onnxcomp_in_memory.bin"


def split_in_memory(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Take the big in-memory initializers (the quantized ones) and those still mapped by absolute
    location (spilled, outside the session's folder) out of ``model`` (a :func:`relative_copy`):
    each becomes an external stub and its values (bytes or a map) are returned, for onnxruntime's
    ``add_external_initializers`` (which uses them in place: no serialised copy, no copy of its own)."""
    taken: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        dtype = numpy_dtype(tensor)
        if source_of(tensor) is not None:
            taken[tensor.name] = map_array(tensor)
            set_reference(tensor, IN_MEMORY_LOCATION, 0, int(taken[tensor.name].nbytes))
            continue
        if dtype is None or not tensor.HasField("raw_data"):
            continue
        raw = tensor.raw_data
        if not mappable(tensor, len(raw)):
            continue
        taken[tensor.name] = np.frombuffer(raw, dtype.newbyteorder("<")).reshape(tuple(tensor.dims))
        tensor.ClearField("raw_data")
        set_reference(tensor, IN_MEMORY_LOCATION, 0, len(raw))
    return taken


def detach_mapped(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy whose mapped initializers are empty in-memory tensors (type and shape kept), and the
    originals by name.

    onnx's version converter drops external references (the tensor comes back empty): it converts
    the copy and :func:`attach_mapped` puts the references back.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    originals: dict[str, onnx.TensorProto] = {}
    for tensor in copy.graph.initializer:
        if source_of(tensor) is not None:
            originals[tensor.name] = onnx.TensorProto()
            originals[tensor.name].CopyFrom(tensor)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = b""
    return copy, originals


def attach_mapped(model: onnx.ModelProto, originals: dict[str, onnx.TensorProto]) -> None:
    """Put back the references :func:`detach_mapped` took out (by initializer name)."""
    for tensor in model.graph.initializer:
        if tensor.name in originals:
            tensor.CopyFrom(originals[tensor.name])


def checkable_file(model: onnx.ModelProto, directory: Path) -> Path:
    """``model`` written to ``directory`` for onnx.checker: mapped tensors point at empty
    placeholder files there (the checker wants relative locations of regular files, not bytes)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    placeholder = directory / "mapped.data"
    placeholder.touch()
    for tensor in copy.graph.initializer:
        found = source_of(tensor)
        if found is not None:
            set_reference(tensor, placeholder.name, found[1], found[2])
    path = directory / "model.onnx"
    path.write_bytes(copy.SerializeToString())
    return path


def copy_bytes(out: BinaryIO, source: str, offset: int, length: int, what: str) -> None:
    """Copy ``length`` bytes of the file ``source`` from ``offset`` to ``out``, a chunk at a time.
    ValueError (naming ``what``) when the file ends first."""
    with open(source, "rb") as src:
        src.seek(offset)
        left = length
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise ValueError(f"{what}: {source} ends before its {length} bytes")
            out.write(chunk)
            left -= len(chunk)


def write_streaming(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` with every initializer in ``NAME.data``, copying mapped bytes in chunks.

    The model is not modified; memory beyond a copy of its in-memory tensors is one chunk.
    Deterministic: initializers in graph order, each at the next multiple of ALIGNMENT.
    """
    header = onnx.ModelProto()
    header.CopyFrom(model)
    data_name = path.name + ".data"
    with open(path.with_name(data_name), "wb") as out:
        for tensor in edh._get_initializer_tensors(header):  # noqa: SLF001 - main graph and bodies
            found = source_of(tensor)
            if found is None and (not tensor.HasField("raw_data") or len(tensor.raw_data) < INLINE_BYTES):
                continue  # typed fields and small tensors (shapes: onnxruntime's shape inference reads them) stay
            offset = -(-out.tell() // ALIGNMENT) * ALIGNMENT
            out.write(b"\0" * (offset - out.tell()))
            if found is not None:
                source, start, length = found
                copy_bytes(out, source, start, length, f"tensor {tensor.name!r}")
            else:
                length = len(tensor.raw_data)
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            set_reference(tensor, data_name, offset, length)
            tensor.data_location = onnx.TensorProto.EXTERNAL
    with open(path, "wb") as fh:
        fh.write(header.SerializeToString(deterministic=True))
