"""New weights of a big model written to disk as they are made, and mapped back (``ir.mapped``).

While :func:`spilling` is active (``api`` runs a mapped model whose output goes to a file), each
big weight a pass makes (quantized codes, sparse or factored weights) is appended to a private
spill file: at creation (``ir.make_constant`` / ``set_constant`` call :func:`spill_array`) or
after a pass (:func:`spill_constants`, for values set directly). The constant then holds a mapped
reference (:class:`~onnxcomp.ir.mapped.MappedValues`) like the source's weights: the graph, its
exports and the onnxruntime sessions over them hold references, not the bytes, and the output
is streamed from the spill file. The folder goes when the run ends.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp.ir.mapped import (
    ALIGNMENT,
    MIN_MAPPED_BYTES,
    MappedValues,
    SourceArray,
    mappable,
    numpy_dtype,
    set_reference,
)

_SPILL_DIRECTORY: ContextVar[Path | None] = ContextVar("onnxcomp_spill_directory", default=None)

#: The one spill file of a run, in the directory :func:`spilling` made.
SPILL_FILE = "spilled.data"


@contextlib.contextmanager
def spilling(parent: Path | None = None) -> Iterator[Path]:
    """Make :func:`spill_constants` move new big weights to a file in a private directory (made
    under ``parent``, default the system's temporary one; removed with everything in it on exit)."""
    directory = Path(tempfile.mkdtemp(prefix=".onnxcomp-spill-", dir=parent)).resolve()
    token = _SPILL_DIRECTORY.set(directory)
    try:
        yield directory
    finally:
        _SPILL_DIRECTORY.reset(token)
        shutil.rmtree(directory, ignore_errors=True)


def spill_array(name: str, values: np.ndarray) -> MappedValues | None:
    """``values`` written to the spill file, as the lazy values of a constant named ``name``; None
    outside :func:`spilling`, under MIN_MAPPED_BYTES, or for a type numpy cannot map back exactly
    (``ir.make_constant`` then keeps the bytes in memory as usual)."""
    directory = _SPILL_DIRECTORY.get()
    found = _numpy_weight(name, values) if directory is not None else None
    if directory is None or found is None:
        return None
    _append(directory, *found)
    return MappedValues(found[0])


def spill_constants(graph: gs.Graph) -> int:
    """Write each big in-memory constant of ``graph`` (a new weight: numpy values, or the
    TensorProto ``ir.make_constant`` holds) to the spill file and leave a mapped reference to it,
    so the bytes leave memory; returns the bytes moved (0 outside :func:`spilling`). Constants
    numpy cannot describe bit for bit (packed 4-bit types) stay."""
    directory = _SPILL_DIRECTORY.get()
    if directory is None:
        return 0
    moved = 0
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        found: tuple[onnx.TensorProto, bytes | memoryview] | None
        if isinstance(values, np.ndarray) and not isinstance(values, SourceArray):
            found = _numpy_weight(tensor.name, values)
        elif isinstance(values, gs.ir.tensor.LazyValues) and not isinstance(
            values, (MappedValues, gs.ir.tensor.SparseValues)
        ):
            found = _proto_weight(tensor.name, values.tensor)
        else:
            found = None
        if found is not None:
            _append(directory, *found)
            tensor._values = MappedValues(found[0])  # noqa: SLF001 - gs has no setter that keeps laziness
            moved += len(found[1])
    return moved


def _append(directory: Path, reference: onnx.TensorProto, data: bytes | memoryview) -> None:
    """Append ``data`` to the spill file (page-aligned) and point ``reference`` at it."""
    path = directory / SPILL_FILE
    with open(path, "ab") as out:
        offset = -(-out.tell() // ALIGNMENT) * ALIGNMENT
        out.write(b"\0" * (offset - out.tell()))
        out.write(data)
    set_reference(reference, str(path), offset, len(data))


def _numpy_weight(name: str, values: np.ndarray) -> tuple[onnx.TensorProto, memoryview] | None:
    """(an empty TensorProto of the type and shape, the little-endian bytes) of numpy values of at
    least MIN_MAPPED_BYTES whose ONNX type maps back to the same numpy dtype; else None."""
    if values.nbytes < MIN_MAPPED_BYTES:
        return None
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    except (KeyError, TypeError, ValueError):
        return None
    reference = onnx.TensorProto(name=name, data_type=data_type, dims=list(values.shape))
    dtype = numpy_dtype(reference)
    if dtype is None or dtype != values.dtype.newbyteorder("="):
        return None
    return reference, np.ascontiguousarray(values.astype(dtype.newbyteorder("<"), copy=False)).data.cast("B")


def _proto_weight(name: str, proto: onnx.TensorProto) -> tuple[onnx.TensorProto, bytes] | None:
    """:func:`_numpy_weight` for a TensorProto holding its bytes in ``raw_data``."""
    if proto.data_location == onnx.TensorProto.EXTERNAL or not proto.HasField("raw_data"):
        return None
    raw = proto.raw_data
    if not mappable(proto, len(raw)):
        return None
    return onnx.TensorProto(name=name, data_type=proto.data_type, dims=list(proto.dims)), raw
