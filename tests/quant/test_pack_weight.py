"""MatMulNBits packing (quant.matmulnbits.pack_weight) against a brute-force layout.

Every code of every storage dtype (int4, uint4, int8, uint8), both weight orientations, K a
multiple of the block and not (padding with the zero point), per group and per channel.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from onnxcomp.formats.nbits import pack_rows, transposed, unpack_rows
from onnxcomp.quant.matmulnbits import PackedWeight, pack_weight
from onnxcomp.quant.qweight import QuantizedWeight
from onnxcomp.quant.spec import Granularity, TensorSpec

DTYPES = {
    "int4": (ml_dtypes.int4, -8, 7, 4, 8),
    "uint4": (ml_dtypes.uint4, 0, 15, 4, 0),
    "int8": (np.int8, -128, 127, 8, 128),
    "uint8": (np.uint8, 0, 255, 8, 0),
}


def _weight(dtype: str, k: int, n: int, block: int, transposed: bool, seed: int) -> QuantizedWeight:
    np_dtype, lo, hi, _, _ = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    codes = rng.integers(lo, hi + 1, (n, k) if transposed else (k, n)).astype(np.int64)
    codes.reshape(-1)[: hi - lo + 1] = np.arange(lo, hi + 1)  # every code at least once
    blocks = -(-k // block) if block else 1
    zshape = (n, blocks) if transposed else (blocks, n)
    zero = rng.integers(lo, hi + 1, zshape) if block else rng.integers(lo, hi + 1, (n,))
    scale = rng.uniform(0.01, 1.0, zero.shape).astype(np.float32)
    spec = TensorSpec(dtype, Granularity("group", block) if block else Granularity("channel"), symmetric=False)
    return QuantizedWeight(
        codes=codes.astype(np_dtype),
        scale=scale,
        zero_point=zero.astype(np_dtype),
        axis=0 if transposed else 1,
        block_size=block,
        dequantized=np.zeros(codes.shape, np.float32),
        spec=spec,
    )


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(("k", "block"), [(64, 16), (80, 32), (50, 16), (40, 0)])  # n * k >= 256 codes
def test_packed_codes_are_the_shifted_codes_with_zero_point_padding(
    dtype: str, transposed: bool, k: int, block: int
) -> None:
    n = 8
    qw = _weight(dtype, k, n, block, transposed, seed=k + block)
    packed = pack_weight(qw, transposed)
    assert isinstance(packed, PackedWeight)
    _, _, _, bits, offset = DTYPES[dtype]
    codes = qw.codes.astype(np.int64) + offset
    q = codes if transposed else codes.T  # (N, K)
    zero = np.asarray(qw.zero_point).astype(np.int64) + offset
    z = (zero if transposed else zero.T).reshape(n, -1)
    width = packed.block_size * (z.shape[1] if block else 1)
    expected = np.repeat(z, packed.block_size, axis=1)[:, :width]  # padding: the block's zero point
    expected[:, :k] = q
    got = unpack_rows(packed.b.reshape(n, -1), bits, width)
    np.testing.assert_array_equal(got.astype(np.int64), expected)
    assert (packed.k, packed.n, packed.bits) == (k, n, bits)
    if packed.zero_points is not None:
        zp = unpack_rows(packed.zero_points.reshape(n, -1), bits, z.shape[1])
        np.testing.assert_array_equal(zp.astype(np.int64), z)


@pytest.mark.parametrize(
    ("name", "lo", "hi", "target"), [("int4", -8, 7, ml_dtypes.int4), ("uint4", 0, 15, ml_dtypes.uint4)]
)
@pytest.mark.parametrize("shape", [(), (16,), (4, 4)])
def test_4bit_storage_equals_the_value_cast(name: str, lo: int, hi: int, target: type, shape: tuple[int, ...]) -> None:
    """storage_array sets the nibbles directly: the same bytes as ml_dtypes' value cast, every code."""
    from onnxcomp.formats import get_format
    from onnxcomp.quant.qweight import storage_array

    codes = np.resize(np.arange(lo, hi + 1), shape).astype(np.int8 if lo < 0 else np.uint8)
    got = storage_array(codes, get_format(name))
    want = codes.astype(target)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("shape", [(4,), (5,), (3, 8), (3, 7), (2, 3, 6), (1, 1), (0, 4), (4, 0)])
def test_pack_rows_puts_the_even_code_in_the_low_nibble(shape: tuple[int, ...]) -> None:
    """Every byte value (high nibbles ignored), odd rows padded with a zero nibble, any memory layout."""
    values = np.random.default_rng(len(shape)).integers(0, 256, shape).astype(np.uint8)
    for layout in (values, np.asfortranarray(values), values[..., ::-1]):
        padded = np.concatenate([layout, np.zeros((*layout.shape[:-1], layout.shape[-1] % 2), np.uint8)], axis=-1)
        want = (padded[..., 0::2] & 0x0F) | ((padded[..., 1::2] & 0x0F) << 4)
        got = pack_rows(layout, 4)
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        if layout.size:  # (unpack_rows cannot reshape an empty array)
            np.testing.assert_array_equal(unpack_rows(got, 4, layout.shape[-1]), layout & 0x0F)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (1, 1), (255, 7), (256, 3), (257, 513), (700, 40)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.float32])
def test_transposed_equals_numpy_transpose(shape: tuple[int, int], dtype: type) -> None:
    """The strip-wise copy is ``a.T`` exactly, C-contiguous, for strips that divide the rows or not."""
    a = np.random.default_rng(shape[0]).integers(-100, 100, shape).astype(dtype)
    for layout in (a, np.asfortranarray(a), a[::-1]):
        got = transposed(layout)
        assert got.flags.c_contiguous and got.dtype == a.dtype
        np.testing.assert_array_equal(got, layout.T)
