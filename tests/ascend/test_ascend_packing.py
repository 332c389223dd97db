"""UINT64 deq_scale and INT4 nibble packing against hand-computed vectors (docs/ascend.md)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.errors import FormatError
from onnxcomp.quant.ascend.packing import (
    deq_scale,
    int4_axis,
    pack_deq_scale,
    pack_int4,
    unpack_deq_scale,
    unpack_int4,
)


def test_deq_scale_packs_the_float32_bit_pattern_in_the_low_word() -> None:
    # 0.25 * [0.5, 0.125, 3.0] = [0.125, 0.03125, 0.75]: exact binary fractions, bit patterns by hand
    deq = deq_scale(np.float32(0.25), np.array([0.5, 0.125, 3.0], np.float32))
    packed = pack_deq_scale(deq)
    assert packed.dtype == np.uint64
    assert packed.tolist() == [0x3E000000, 0x3D000000, 0x3F400000]
    assert packed[0] >> np.uint64(32) == 0  # upper word 0: offset_w is always 0
    np.testing.assert_array_equal(unpack_deq_scale(packed), deq)


def test_deq_scale_of_a_non_dyadic_product_is_the_float32_product() -> None:
    deq = deq_scale(np.float32(0.1), np.array([0.02], np.float32))
    expected = np.float32(np.float32(0.1) * np.float32(0.02))
    assert pack_deq_scale(deq).tolist() == [int(np.array(expected).view(np.uint32))]


def test_s19_clears_the_low_13_mantissa_bits() -> None:
    values = np.array([0x3F800008, 0x3F802000, 0x3FFFFFFF], np.uint32).view(np.float32)
    packed = pack_deq_scale(deq_scale(np.float32(1.0), values, s19=True))
    assert packed.tolist() == [0x3F800000, 0x3F802000, 0x3FFFE000]


def test_unpack_rejects_a_non_zero_upper_word() -> None:
    with pytest.raises(FormatError, match="upper word"):
        unpack_deq_scale(np.array([(1 << 40) | 0x3F800000], np.uint64))


def test_int4_packs_element_2k_low_and_2k_plus_1_high() -> None:
    codes = np.array([[1, -2, 7, -8], [0, -1, 3, 4]], np.int8)
    packed = pack_int4(codes, axis=1)
    # row 0: low 0x1 | high 0xE -> 0xE1 = -31; low 0x7 | high 0x8 -> 0x87 = -121
    # row 1: low 0x0 | high 0xF -> 0xF0 = -16; low 0x3 | high 0x4 -> 0x43 = 67
    assert packed.dtype == np.int8
    assert packed.tolist() == [[-31, -121], [-16, 67]]
    np.testing.assert_array_equal(unpack_int4(packed, axis=1), codes)


def test_int4_packs_along_the_given_axis_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=(6, 4, 3, 3)).astype(np.int8)
    for axis in range(4):
        if codes.shape[axis] % 2:
            with pytest.raises(FormatError, match="even"):
                pack_int4(codes, axis)
            continue
        packed = pack_int4(codes, axis)
        assert packed.shape[axis] == codes.shape[axis] // 2
        np.testing.assert_array_equal(unpack_int4(packed, axis), codes)
    first = np.moveaxis(codes, 0, -1)
    by_hand = (first[..., 0::2].astype(np.int16) & 0xF) | ((first[..., 1::2].astype(np.int16) & 0xF) << 4)
    np.testing.assert_array_equal(np.moveaxis(pack_int4(codes, 0).view(np.uint8), 0, -1), by_hand)


def test_int4_rejects_codes_outside_the_range() -> None:
    with pytest.raises(FormatError, match=r"\[-8, 7\]"):
        pack_int4(np.array([8, 0], np.int8), 0)


def test_int4_axis_is_the_input_channel_axis() -> None:
    assert int4_axis("Conv") == 1
    assert int4_axis("ConvTranspose") == 0
    assert int4_axis("MatMul") == 0
    assert int4_axis("Gemm", trans_b=True) == 1
    assert int4_axis("Gemm", trans_b=False) == 0
