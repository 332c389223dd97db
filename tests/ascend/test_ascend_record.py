"""The record schema (built in code) against the spec's example and AMCT's parser rules."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from onnxcomp.errors import FormatError
from onnxcomp.quant.ascend.layers import AscendLayer
from onnxcomp.quant.ascend.record import ScaleOffsetRecord, parse_record, record_text

SPEC_EXAMPLE = (
    'record { key: "conv1" value { scale_d: 0.0798 offset_d: 1 scale_w: 0.00298 offset_w: 0 dst_type: "INT8" } }'
)


def test_the_spec_example_parses_with_field_defaults() -> None:
    entry = parse_record(SPEC_EXAMPLE)["conv1"]
    assert entry.offset_d == 1 and list(entry.offset_w) == [0]
    assert np.float32(entry.scale_d) == np.float32(0.0798) and np.float32(entry.scale_w[0]) == np.float32(0.00298)
    assert (entry.act_type, entry.wts_type, entry.fakequant_precision_mode) == ("INT8", "INT8", "DEFAULT")
    assert not entry.skip_fusion


def test_field_numbers_are_amct_s() -> None:
    fields = {f.name: f.number for f in ScaleOffsetRecord.DESCRIPTOR.fields_by_name["record"].message_type.fields}
    assert fields == {"key": 1, "value": 2, "kv_cache_value": 3}
    layer = ScaleOffsetRecord.DESCRIPTOR.fields_by_name["record"].message_type.fields_by_name["value"].message_type
    numbers = {f.name: f.number for f in layer.fields}
    assert numbers == {
        "scale_d": 1, "offset_d": 2, "scale_w": 3, "offset_w": 4, "shift_bit": 5, "tensor_balance_factor": 6,
        "skip_fusion": 9, "dst_type": 10, "act_type": 11, "wts_type": 12, "fakequant_precision_mode": 13,
        "scale_h": 21, "offset_h": 22, "scale_r": 23, "offset_r": 24,
    }  # fmt: skip
    # the binary encoding of scale_d = 0.5: tag (1 << 3 | 5 = 0x0D), float32 little-endian
    message = ScaleOffsetRecord()
    text_format.Parse('record { key: "a" value { scale_d: 0.5 } }', message)
    assert message.SerializeToString() == b"\x0a\x0a\x0a\x01a\x12\x05\x0d\x00\x00\x00\x3f"


def test_written_floats_read_back_as_the_same_float32() -> None:
    rng = np.random.default_rng(3)
    scale_w = rng.uniform(1e-4, 1e-1, 8).astype(np.float32)
    layer = AscendLayer("n", "Conv", "x", "INT8", "INT8", np.float32(rng.uniform(1e-3, 1)), 5, scale_w,
                        np.zeros((8, 1, 1, 1), np.int8), 0, None)  # fmt: skip
    entry = parse_record(record_text([layer]))["n"]
    assert np.float32(entry.scale_d).view(np.uint32) == layer.scale_d.view(np.uint32)
    np.testing.assert_array_equal(np.array(entry.scale_w, np.float32).view(np.uint32), scale_w.view(np.uint32))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('record { key: "c" value { offset_w: 3 } }', "offset_w != 0"),
        ('record { key: "c" value { wts_type: "INT2" } }', "wts_type 'INT2'"),
        ('record { key: "c" value { scale_q: 1 } }', "not a ScaleOffsetRecord"),
    ],
)
def test_records_amct_would_reject_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message) as info:
        parse_record(text, "r.txt")
    assert str(info.value).startswith("r.txt: ") and "\n" not in str(info.value)
