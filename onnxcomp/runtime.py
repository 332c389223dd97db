"""The one onnxruntime runner: CPU sessions, and "expose these tensors and run" for every collector.

Calibration, the SQNR report, reconstruction and refits all need intermediate tensors of a model:
:func:`with_outputs` adds them as extra graph outputs (untyped ``make_empty_tensor_value_info``:
onnxruntime accepts it, so no shape inference is needed) and :class:`TensorRunner` runs that copy
with ``ORT_DISABLE_ALL`` so intermediate names survive. ``docs/onnxruntime.md`` says what the CPU
provider runs and fuses.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxcomp.errors import CalibrationError
from onnxcomp.ir.inline_data import write_inline
from onnxcomp.ir.mapped import is_large, is_mapped, relative_copy, split_in_memory, write_streaming

#: protobuf cannot serialise a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1

#: Intra-op threads for sessions that only compute (calibration, reports): 0 = every core.
ALL_CORES = 0

#: Bytes per element a tensor field can take: raw_data holds the element size (sub-byte types
#: round up), packed varints at most 10 (negative int32 / any uint64), float 4 and double 8.
_RAW_BYTES: dict[int, int] = {
    onnx.TensorProto.DOUBLE: 8,
    onnx.TensorProto.INT64: 8,
    onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.COMPLEX128: 16,
    onnx.TensorProto.COMPLEX64: 8,
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4,
}
_VARINT_BYTES = 10
_TENSOR_OVERHEAD = 64  # tag, length, data_type, data_location, a few dims' varints


def fits_protobuf(model: onnx.ModelProto) -> bool:
    """``model.ByteSize() < PROTOBUF_LIMIT``, mostly without serialising it.

    upb computes ``ByteSize()`` by serialising the whole message (as long as ``SerializeToString``
    on a model with its weights), so a bound is tried first: the graph's initializers from their
    shapes and types (data that matches the dims, as onnx.checker and onnxruntime require),
    everything else from its own exact size (nodes, I/O, metadata: small). Only a bound of 2 GiB
    or more is confirmed by the exact size.
    """
    bound = _size_bound(model)
    return bound < PROTOBUF_LIMIT or model.ByteSize() < PROTOBUF_LIMIT


def _size_bound(model: onnx.ModelProto) -> int:
    total = 0
    for field, value in model.ListFields():
        if field.name != "graph":
            total += _field_bound(field, value)
            continue
        for gfield, gvalue in model.graph.ListFields():
            if gfield.name != "initializer":
                total += _field_bound(gfield, gvalue)
                continue
            for tensor in gvalue:
                one = _tensor_bound(tensor)
                if one is None:
                    return PROTOBUF_LIMIT  # strings or segments: only the exact size says
                total += one + 16  # + tag and length
        total += 16
    return total


def _field_bound(field: Any, value: Any) -> int:  # a protobuf FieldDescriptor and its value
    """An upper bound of one set field's serialised size (sub-messages by their exact size)."""
    items = value if field.is_repeated else [value]
    if field.type == field.TYPE_MESSAGE:
        return sum(item.ByteSize() + 16 for item in items)
    if field.type in (field.TYPE_STRING, field.TYPE_BYTES):
        return sum(4 * len(item) + 16 for item in items)  # UTF-8: at most 4 bytes a character
    return 16 * len(items)


def _element_count(tensor: onnx.TensorProto) -> int:
    """Elements a tensor's dims promise (a negative dim counts as 0), in exact Python integers."""
    count = 1
    for dim in tensor.dims:
        count *= max(int(dim), 0)
    return count


def _tensor_bound(tensor: onnx.TensorProto) -> int | None:
    """An upper bound of a tensor's serialised size from its shape and type, or None."""
    if tensor.data_type == onnx.TensorProto.STRING or len(tensor.string_data) or tensor.HasField("segment"):
        return None
    count = _element_count(tensor)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        payload = 0
    elif tensor.HasField("raw_data"):
        typed = (tensor.float_data, tensor.int32_data, tensor.int64_data, tensor.double_data, tensor.uint64_data)
        if any(len(values) for values in typed):
            return None  # both storages: not a tensor the bound knows
        payload = count * _RAW_BYTES.get(tensor.data_type, 2)  # 16-bit and narrower: 2 bytes is an upper bound
    else:
        payload = count * _VARINT_BYTES
    meta = sum(e.ByteSize() + 16 for e in tensor.external_data)
    return payload + meta + 4 * (len(tensor.name) + len(tensor.doc_string)) + 11 * len(tensor.dims) + _TENSOR_OVERHEAD


def write_model_file(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Serialise ``model`` to ``path`` (deterministic bytes), with every tensor in ``NAME.data`` if ``external``.

    A mapped model (weights left in their files, ``ir.mapped``) has its weights copied over in
    chunks, into ``NAME.data`` or into the one file (``ir.inline_data``).
    """
    if is_mapped(model):
        (write_streaming if external else write_inline)(model, path)
    elif external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=0,  # every initializer: the .data file always exists
        )
    else:
        with open(path, "wb") as fh:
            fh.write(model.SerializeToString(deterministic=True))


def ort_session(  # noqa: ANN201
    model: onnx.ModelProto | Path | bytes,
    level: str = "all",
    threads: int = 1,
    config: dict[str, str] | None = None,
    optimized_path: str | None = None,
    expose: Sequence[str] = (),
    arena: bool = True,
):
    """An onnxruntime CPU session for an in-memory model (through a temporary file) or a model file.

    ``level``: disable | basic | extended | all; ``threads``: intra-op threads (0 = all cores);
    ``config``: session config entries (e.g. ``session.qdq_matmulnbits_accuracy_level``);
    ``optimized_path``: where onnxruntime saves the graph it optimized (what it will really run);
    ``expose``: intermediate tensors the session also outputs (an in-memory model is not copied for
    them: see :func:`_outputs_suffix`); ``arena=False``: no CPU memory arena or memory pattern, so
    the session keeps no peak-sized buffer between runs (for many sessions alive at once).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    if not arena:
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
    suffix = b""
    if expose:
        if not isinstance(model, onnx.ModelProto):
            raise TypeError("ort_session(expose=...) needs an in-memory model")
        if is_mapped(model) or not fits_protobuf(model):
            model = with_outputs(model, expose)  # their weights leave through references / external data
        else:
            suffix = _outputs_suffix(model, expose)  # appended to the serialisation: no copy of the model
    if isinstance(model, Path):  # a file (external data beside it): onnxruntime reads it directly
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    if isinstance(model, bytes):  # already serialised (model_io.serialize_model): no second copy
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    if is_mapped(model) and fits_protobuf(model):
        # onnxruntime reads the weights from their files (relative to the folder), never a copy of them
        relative, folder = relative_copy(model)
        # No arena: a DequantizeLinear's float weight is freed after its reader runs instead of
        # being kept for the next run (an arena would hold a float copy of every quantized weight).
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        if is_large(model):
            # MatMul reads the mapped weights where they are: prepacking would add a packed copy of
            # each. Unpacked sums differ from packed ones in the last bit (and depend on the thread
            # count): below this size the packed copy is worth the same bytes as in memory.
            opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        # The new (quantized) weights go in from memory, in place: not serialised, not copied by onnxruntime
        taken = split_in_memory(relative)
        values = [ort.OrtValue.ortvalue_from_numpy(v) for v in taken.values()]
        if values:
            opts.add_external_initializers(list(taken), values)
        session = ort.InferenceSession(relative.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        session._onnxcomp_initializers = (taken, values)  # noqa: SLF001 - must outlive the session
        weakref.finalize(session, release_freed_memory)  # its weights leave the process with it
        return session
    return _session_from_file(model, opts, suffix)


#: In-memory models read unchanged from a file (weights inside it), while :func:`file_backed` is active.
_FILE_BACKED: dict[int, tuple[onnx.ModelProto, Path]] = {}


@contextlib.contextmanager
def file_backed(model: onnx.ModelProto | None, path: Path | None) -> Iterator[None]:
    """While active, sessions of ``model`` (read unchanged from ``path``, which holds all of its
    weights) are built from a copy of that file plus the exposed outputs instead of a serialisation
    of ``model``: no model-sized bytes, no serialising time. A model with external data, or without
    a file, is served as usual. The caller promises ``model`` is not modified meanwhile."""
    if model is None or path is None or is_mapped(model) or not _holds_weights(Path(path), model):
        yield
        return
    key = id(model)
    _FILE_BACKED[key] = (model, Path(path))  # the reference keeps the id from being reused meanwhile
    try:
        yield
    finally:
        _FILE_BACKED.pop(key, None)


def _holds_weights(path: Path, model: onnx.ModelProto) -> bool:
    """Whether the file can hold ``model``'s weights itself: no external data in memory, and the
    file at least as large as the weights' raw bytes (a model loaded with its external data has
    them in memory, but its file holds references only)."""
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return False
    raw = sum(
        _element_count(t) * _RAW_BYTES.get(t.data_type, 1) for t in model.graph.initializer if t.HasField("raw_data")
    )
    try:
        return path.stat().st_size >= raw
    except OSError:
        return False


def _session_from_file(model: onnx.ModelProto, opts: object, suffix: bytes = b""):  # noqa: ANN202
    """A session of ``model`` (plus serialised ``suffix``) loaded from a temporary file.

    onnxruntime copies a bytes argument before parsing it; from a file it parses directly, and
    our serialisation is freed before the session is built (one model-sized copy fewer each).
    A model of 2 GB or more goes with its weights as external data (protobuf's limit). A model
    :func:`file_backed` by its file is copied from there (the kernel copies it, not Python).
    """
    import onnxruntime as ort

    backing = _FILE_BACKED.get(id(model))
    with tempfile.TemporaryDirectory(prefix="onnxcomp-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        if backing is not None and backing[0] is model:
            try:
                if not suffix:
                    return ort.InferenceSession(str(backing[1]), opts, providers=["CPUExecutionProvider"])
                shutil.copyfile(backing[1], path)
                with path.open("ab") as f:
                    f.write(suffix)
                return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception:  # noqa: BLE001 - the file is not what it seemed (weights beside it): serialise
                path.unlink(missing_ok=True)
        if not fits_protobuf(model):
            write_model_file(model, path, external=True)
        else:
            with path.open("wb") as f:
                f.write(model.SerializeToString())
                f.write(suffix)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def release_freed_memory() -> None:
    """Give memory freed by onnxruntime back to the system (glibc keeps freed blocks otherwise,
    and a big model's next session would be counted on top of the last one's)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """The body allocates numpy arrays without asking for transparent huge pages.

    numpy madvises every array of 4 MiB or more for huge pages; where the kernel then compacts
    memory on the first touch (``transparent_hugepage/defrag = madvise``, a common default) with
    much of RAM in the page cache, as after reading a big model, each fresh weight-sized array
    stalls: 0.6 s of a 700 MB model's INT4 run, the lm_head's dequantized copy alone 0.5 s instead
    of 0.09 s. The previous setting is restored after the body (a no-op where numpy lacks it).
    """
    setter = getattr(getattr(getattr(np, "_core", None), "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:
        yield
        return
    previous = setter(False)
    try:
        yield
    finally:
        setter(previous)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's are long), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def with_outputs(model: onnx.ModelProto, names: Sequence[str], truncate: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (optionally truncated to what they need).

    ``truncate`` keeps only the nodes the named tensors depend on and drops the original outputs
    (skipped for graphs with subgraphs, whose outer-scope reads are not followed).
    """
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    graph = augmented.graph
    subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    has_subgraphs = any(a.type in subgraph for n in graph.node for a in n.attribute)
    if truncate and not has_subgraphs:
        needed, kept = set(names), []
        for node in reversed(graph.node):
            if needed.intersection(node.output):
                kept.append(node)
                needed.update(node.input)
        del graph.node[:]
        graph.node.extend(reversed(kept))
        del graph.output[:]
    existing = {o.name for o in graph.output}
    graph.output.extend(helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in existing)
    return augmented


def _outputs_suffix(model: onnx.ModelProto, names: Sequence[str]) -> bytes:
    """Bytes that, appended to ``model``'s serialisation, add ``names`` as graph outputs.

    Protobuf merges a message field that occurs twice and appends repeated fields, so
    ``model bytes + suffix`` parses as the model with the extra outputs: no model-sized copy.
    """
    existing = {o.name for o in model.graph.output}
    extra = onnx.ModelProto()
    extra.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in existing)
    return extra.SerializeToString()


class TensorRunner:
    """An onnxruntime session of a model exposing ``names`` as outputs (optionally truncated to them)."""

    def __init__(self, model: onnx.ModelProto, names: list[str], truncate: bool = False) -> None:
        if truncate:
            self.session = ort_session(with_outputs(model, names, truncate), level="disable", threads=ALL_CORES)
        else:
            self.session = ort_session(model, level="disable", threads=ALL_CORES, expose=names)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.names = names

    def run(self, batch: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.names, {n: batch[n] for n in self.inputs})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise CalibrationError(f"calibration batch {index}: onnxruntime failed: {first_line(exc)}") from exc
        return dict(zip(self.names, values, strict=True))
