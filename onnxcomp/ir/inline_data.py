"""Big weights stored *inside* an .onnx file, mapped from it instead of read.

An .onnx file is one protobuf message; each initializer's values are a length-delimited
``raw_data`` field somewhere in it. :func:`load_without_inline_data` walks the protobuf wire
format of the file (through a memory map: only the headers are read), copies every field except
the big ``raw_data`` fields of the main graph's initializers into a small message, parses that,
and makes each of those initializers an external reference to its bytes in the file itself
(absolute location, offset, length: the in-memory form of ``ir.mapped``). A 700 MB model then
loads in a few MB, and every pass, session and write reads its weights through maps, as for a
model whose weights are in a separate data file.

Wire format (protobuf encoding): each field is a varint key ``number << 3 | type`` followed by a
varint (type 0), 8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5).
ModelProto.graph is field 7, GraphProto.initializer field 5, TensorProto.raw_data field 9.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxcomp.ir.mapped import copy_bytes, mappable, set_reference, source_of

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_LENGTH_DELIMITED = 2


class WireFormatError(ValueError):
    """The bytes are not a well-formed protobuf message (a truncated or foreign file)."""


@dataclass(frozen=True)
class _Field:
    number: int
    start: int  # first byte of the key
    body: int  # first byte of the payload (after the length, for length-delimited fields)
    end: int  # one past the last byte
    wire_type: int


def _varint(buf: memoryview | mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError(f"bad varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview | mmap.mmap, start: int, end: int) -> list[_Field]:
    """The top-level fields of the message in ``buf[start:end]``."""
    out: list[_Field] = []
    pos = start
    while pos < end:
        key, body = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, stop = _varint(buf, body, end)
        elif wire_type == 1:
            stop = body + 8
        elif wire_type == _LENGTH_DELIMITED:
            length, body = _varint(buf, body, end)
            stop = body + length
        elif wire_type == 5:
            stop = body + 4
        else:
            raise WireFormatError(f"unsupported wire type {wire_type} at byte {pos}")
        if number == 0 or stop > end:
            raise WireFormatError(f"field at byte {pos} runs past its message")
        out.append(_Field(number, pos, body, stop, wire_type))
        pos = stop
    return out


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _delimited_header(number: int, length: int) -> bytes:
    """The key and length that precede a length-delimited field's ``length`` bytes."""
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(length)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _delimited_header(number, len(payload)) + payload


def _strip_tensor(buf: mmap.mmap, field: _Field, min_bytes: int) -> tuple[bytes, tuple[int, int] | None]:
    """One initializer's bytes without its raw data when that is ``min_bytes`` or more, and the
    (offset, length) of the raw data left in the file (None: the tensor is copied whole)."""
    inner = _fields(buf, field.body, field.end)
    raw = [f for f in inner if f.number == _TENSOR_RAW_DATA and f.wire_type == _LENGTH_DELIMITED]
    external = any(f.number == _TENSOR_EXTERNAL_DATA for f in inner)
    if len(raw) != 1 or external or raw[0].end - raw[0].body < min_bytes:
        return bytes(buf[field.start : field.end]), None
    kept = b"".join(bytes(buf[f.start : f.end]) for f in inner if f is not raw[0])
    return _length_delimited(_GRAPH_INITIALIZER, kept), (raw[0].body, raw[0].end - raw[0].body)


def load_without_inline_data(path: Path, min_bytes: int) -> tuple[onnx.ModelProto, dict[int, tuple[int, int]], int]:
    """The model in ``path`` without the ``raw_data`` of its main-graph initializers of
    ``min_bytes`` or more, the (offset, length) of each left out, by initializer index, and
    their total bytes. Nothing is left out (and the model is parsed as usual) when the file
    has no such initializer. Raises :class:`WireFormatError` for a malformed file."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        top = _fields(buf, 0, len(buf))
        graphs = [f for f in top if f.number == _MODEL_GRAPH and f.wire_type == _LENGTH_DELIMITED]
        if len(graphs) != 1:  # no graph, or a graph split over several fields (protobuf merges them)
            return onnx.ModelProto.FromString(bytes(buf[:])), {}, 0
        left_out: dict[int, tuple[int, int]] = {}
        graph_parts: list[bytes] = []
        index = 0
        for field in _fields(buf, graphs[0].body, graphs[0].end):
            if field.number == _GRAPH_INITIALIZER and field.wire_type == _LENGTH_DELIMITED:
                data, found = _strip_tensor(buf, field, min_bytes)
                if found is not None:
                    left_out[index] = found
                graph_parts.append(data)
                index += 1
            else:
                graph_parts.append(bytes(buf[field.start : field.end]))
        if not left_out:
            return onnx.ModelProto.FromString(bytes(buf[:])), {}, 0
        parts = [
            _length_delimited(_MODEL_GRAPH, b"".join(graph_parts)) if f is graphs[0] else bytes(buf[f.start : f.end])
            for f in top
        ]
    model = onnx.ModelProto.FromString(b"".join(parts))
    return model, left_out, sum(length for _, length in left_out.values())


def map_inline_data(model: onnx.ModelProto, path: Path, left_out: dict[int, tuple[int, int]], mapped: bool) -> None:
    """Point the initializers :func:`load_without_inline_data` left out at their bytes in ``path``
    (``mapped``; :func:`ir.mapped.mappable` tensors only), or read those bytes back into the model."""
    source = str(Path(path).resolve())
    with open(path, "rb") as fh:
        for index, (offset, length) in left_out.items():
            tensor = model.graph.initializer[index]
            if mapped and mappable(tensor, length):
                set_reference(tensor, source, offset, length)
            else:
                fh.seek(offset)
                tensor.raw_data = fh.read(length)


@dataclass(frozen=True)
class _Stream:
    """``length`` bytes of ``source`` from ``offset``, copied when the file is written."""

    source: str
    offset: int
    length: int


_Part = bytes | _Stream


def _size(parts: list[_Part]) -> int:
    return sum(p.length if isinstance(p, _Stream) else len(p) for p in parts)


def _delimited_parts(number: int, parts: list[_Part]) -> list[_Part]:
    return [_delimited_header(number, _size(parts)), *parts]


def write_inline(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` as one .onnx file, the bytes of its mapped initializers (``ir.mapped``)
    copied from their files into their ``raw_data`` in chunks: the bytes
    ``SerializeToString(deterministic=True)`` gives for the model with those bytes read in,
    without holding them. Raises ValueError when a source file is shorter than its reference."""
    header = onnx.ModelProto()
    header.CopyFrom(model)
    streams: dict[int, _Stream] = {}
    for index, tensor in enumerate(header.graph.initializer):
        found = source_of(tensor)
        if found is not None:
            streams[index] = _Stream(*found)
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            tensor.raw_data = b""  # a present, empty field: its place in the bytes is kept
    blob = header.SerializeToString(deterministic=True)
    del header
    view = memoryview(blob)
    parts: list[_Part] = []
    for top in _fields(view, 0, len(blob)):
        if top.number != _MODEL_GRAPH or top.wire_type != _LENGTH_DELIMITED or not streams:
            parts.append(bytes(view[top.start : top.end]))
            continue
        graph: list[_Part] = []
        index = 0
        for field in _fields(view, top.body, top.end):
            if field.number != _GRAPH_INITIALIZER or field.wire_type != _LENGTH_DELIMITED:
                graph.append(bytes(view[field.start : field.end]))
                continue
            stream = streams.get(index)
            index += 1
            if stream is None:
                graph.append(bytes(view[field.start : field.end]))
                continue
            fields: list[_Part] = []
            for inner in _fields(view, field.body, field.end):
                if inner.number == _TENSOR_RAW_DATA:
                    fields += _delimited_parts(_TENSOR_RAW_DATA, [stream])
                else:
                    fields.append(bytes(view[inner.start : inner.end]))
            graph += _delimited_parts(_GRAPH_INITIALIZER, fields)
        parts += _delimited_parts(_MODEL_GRAPH, graph)
    with open(path, "wb") as out:
        for part in parts:
            if isinstance(part, bytes):
                out.write(part)
                continue
            copy_bytes(out, part.source, part.offset, part.length, f"bytes at offset {part.offset}")
