"""The AMCT record file: protobuf text format of ``ScaleOffsetRecord`` (docs/ascend.md, "Record file").

AMCT's ``scale_offset_record.proto`` is not a Python module anywhere we can import, so the
schema's descriptor is built here from the spec's fields (same names, numbers and types); the
record is written and parsed with protobuf's ``text_format`` against it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

from onnxcomp.errors import FormatError
from onnxcomp.quant.ascend.layers import AscendLayer

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED, _REQUIRED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED, _F.LABEL_REQUIRED
_FLOAT, _INT32, _UINT32, _BOOL, _STRING, _MESSAGE = (
    _F.TYPE_FLOAT, _F.TYPE_INT32, _F.TYPE_UINT32, _F.TYPE_BOOL, _F.TYPE_STRING, _F.TYPE_MESSAGE,
)  # fmt: skip
_PACKAGE = "onnxcomp.ascend"

#: (message, [(field, number, label, type, message type or default)]) as in AMCT's proto.
_SCHEMA: list[tuple[str, list[tuple[str, int, int, int, str | None]]]] = [
    (
        "SingleLayerRecord",
        [
            ("scale_d", 1, _OPTIONAL, _FLOAT, None),
            ("offset_d", 2, _OPTIONAL, _INT32, None),
            ("scale_w", 3, _REPEATED, _FLOAT, None),
            ("offset_w", 4, _REPEATED, _INT32, None),
            ("shift_bit", 5, _REPEATED, _UINT32, None),
            ("tensor_balance_factor", 6, _REPEATED, _FLOAT, None),
            ("skip_fusion", 9, _OPTIONAL, _BOOL, "false"),
            ("dst_type", 10, _OPTIONAL, _STRING, "INT8"),
            ("act_type", 11, _OPTIONAL, _STRING, "INT8"),
            ("wts_type", 12, _OPTIONAL, _STRING, "INT8"),
            ("fakequant_precision_mode", 13, _OPTIONAL, _STRING, "DEFAULT"),
            ("scale_h", 21, _OPTIONAL, _FLOAT, None),
            ("offset_h", 22, _OPTIONAL, _INT32, None),
            ("scale_r", 23, _REPEATED, _FLOAT, None),
            ("offset_r", 24, _REPEATED, _INT32, None),
        ],
    ),
    ("SingleLayerKVCacheRecord", [("scale", 1, _REPEATED, _FLOAT, None), ("offset", 2, _REPEATED, _INT32, None)]),
    (
        "AttrProto",
        [
            ("name", 1, _OPTIONAL, _STRING, None),
            ("type", 2, _OPTIONAL, _STRING, None),  # FLOAT, INT, STRING, FLOATS, INTS, STRINGS
            ("f", 3, _OPTIONAL, _FLOAT, None),
            ("i", 4, _OPTIONAL, _INT32, None),
            ("s", 5, _OPTIONAL, _STRING, None),
            ("floats", 6, _REPEATED, _FLOAT, None),
            ("ints", 7, _REPEATED, _INT32, None),
            ("strings", 8, _REPEATED, _STRING, None),
        ],
    ),
    ("PruneNode", [("name", 1, _REQUIRED, _STRING, None), ("attr", 2, _REPEATED, _MESSAGE, "AttrProto")]),
    (
        "PruneRecord",
        [
            ("producer", 1, _REPEATED, _MESSAGE, "PruneNode"),
            ("consumer", 2, _REPEATED, _MESSAGE, "PruneNode"),
            ("selective_prune", 3, _OPTIONAL, _MESSAGE, "PruneNode"),
        ],
    ),
    (
        "MapFiledEntry",
        [
            ("key", 1, _OPTIONAL, _STRING, None),
            ("value", 2, _OPTIONAL, _MESSAGE, "SingleLayerRecord"),
            ("kv_cache_value", 3, _OPTIONAL, _MESSAGE, "SingleLayerKVCacheRecord"),
        ],
    ),
    (
        "ScaleOffsetRecord",
        [("record", 1, _REPEATED, _MESSAGE, "MapFiledEntry"), ("prune_record", 2, _REPEATED, _MESSAGE, "PruneRecord")],
    ),
]


def _build() -> type[Message]:
    file = descriptor_pb2.FileDescriptorProto(name="onnxcomp_ascend_record.proto", package=_PACKAGE, syntax="proto2")
    for message, fields in _SCHEMA:
        msg = file.message_type.add(name=message)
        for name, number, label, kind, extra in fields:
            field = msg.field.add(name=name, number=number, label=label, type=kind)
            if kind == _MESSAGE:
                field.type_name = f".{_PACKAGE}.{extra}"
            elif extra is not None:
                field.default_value = extra
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ScaleOffsetRecord"))


#: The ``ScaleOffsetRecord`` message class.
ScaleOffsetRecord = _build()


def record_message(layers: list[AscendLayer]) -> Message:
    """The record of ``layers`` keyed by node name (scale_w / offset_w per output channel)."""
    record = ScaleOffsetRecord()
    for layer in layers:
        entry = record.record.add()
        entry.key = layer.node
        value = entry.value
        value.scale_d = float(layer.scale_d)
        value.offset_d = layer.offset_d
        value.scale_w.extend(float(s) for s in layer.scale_w)
        value.offset_w.extend([0] * layer.scale_w.size)
        value.dst_type = layer.act_type
        value.act_type = layer.act_type
        value.wts_type = layer.wts_type
        if layer.s19:
            value.fakequant_precision_mode = "FORCE_FP16_QUANT"
        if layer.balance is not None:
            value.tensor_balance_factor.extend(float(f) for f in np.asarray(layer.balance).reshape(-1))
    return record


def record_text(layers: list[AscendLayer]) -> str:
    """The record file's text (deterministic: layers in graph order, floats as shortest float32 repr)."""
    return text_format.MessageToString(record_message(layers))


def parse_record(text: str, where: str = "record") -> dict[str, Any]:
    """node name -> ``SingleLayerRecord`` message; a malformed record or AMCT-invalid entry raises."""
    record = ScaleOffsetRecord()
    try:
        text_format.Parse(text, record)
    except text_format.ParseError as exc:
        raise FormatError(f"{where}: not a ScaleOffsetRecord in protobuf text format ({exc})") from exc
    entries: dict[str, Any] = {}
    for entry in record.record:
        value = entry.value
        if any(o != 0 for o in value.offset_w):
            raise FormatError(f"{where}: layer {entry.key!r} has offset_w != 0 (AMCT requires symmetric weights)")
        if value.wts_type not in ("INT4", "INT6", "INT7", "INT8"):
            raise FormatError(f"{where}: layer {entry.key!r} has wts_type {value.wts_type!r}")
        entries[entry.key] = value
    return entries
