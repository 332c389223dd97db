"""Integer formats: qparams rules of the spec and bit-identity with onnxruntime Q/DQ (opset 21)."""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import FormatError
from onnxcomp.formats import IntegerFormat, get_format

INT_FORMATS = ["int8", "uint8", "int4", "uint4"]
_ML = {"int8": np.int8, "uint8": np.uint8, "int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}
_CAST_TO = {  # ORT cannot hand 4-bit outputs to numpy: cast the codes to 8 bits in the graph
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int4": TensorProto.INT8,
    "uint4": TensorProto.UINT8,
}


def _int(name: str) -> IntegerFormat:
    fmt = get_format(name)
    assert isinstance(fmt, IntegerFormat)
    return fmt


def _ort_qdq(
    fmt: IntegerFormat, x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (cast to 8 bits inside the graph) and dequantized values from onnxruntime."""
    attrs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("Cast", ["q"], ["codes"], to=_CAST_TO[fmt.name]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    inits = [
        numpy_helper.from_array(scale.astype(np.float32), "s"),
        numpy_helper.from_array(zp.astype(_ML[fmt.name]), "z"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [
            helper.make_tensor_value_info("codes", _CAST_TO[fmt.name], list(x.shape)),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape)),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    codes, y = sess.run(None, {"x": x})
    return codes, y


def _data(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    column_scale = rng.choice([0.01, 1.0, 30.0], size=shape[-1]).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32) * column_scale
    x.ravel()[::7] *= 50  # clipped values
    return x


#: one block of IntegerFormat.quantize's scratch buffer; several with a partial last one; rows
#: longer than a block (one row a block)
SHAPES = [(24, 37), (300, 700), (2, 70001)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("name", INT_FORMATS)
def test_bit_identical_to_onnxruntime(name: str, axis: int | None, symmetric: bool, shape: tuple[int, int]) -> None:
    fmt = _int(name)
    rng = np.random.default_rng(zlib.crc32(f"{name}/{axis}/{symmetric}/{shape}".encode()))
    x = _data(rng, shape)
    if axis is None:
        lo, hi = x.min(), x.max()
        bshape: tuple[int, ...] = ()
    else:
        lo, hi = x.min(axis=1 - axis), x.max(axis=1 - axis)
        bshape = (-1, 1) if axis == 0 else (1, -1)
    lo, hi = lo * 0.5, hi * 0.5  # calibrated range narrower than the data: exercises clipping
    scale, zp = fmt.compute_qparams(lo, hi, symmetric)
    # exact ties x = (k + 0.5) * scale exercise RNE in the division
    k = rng.integers(-20, 20, size=x.shape).astype(np.float32)
    s_b = scale.reshape(bshape) if axis is not None else scale
    ties = (k + np.float32(0.5)) * s_b
    x = np.where(rng.random(x.shape) < 0.2, ties, x).astype(np.float32)
    codes_ort, y_ort = _ort_qdq(fmt, x, scale, zp, axis)
    zp_b = zp.reshape(bshape) if axis is not None else zp
    codes = fmt.quantize(x, s_b, zp_b)
    assert codes.dtype == fmt.storage_dtype
    assert np.array_equal(codes.astype(np.int64), codes_ort.astype(np.int64))
    y = fmt.dequantize(codes, s_b, zp_b)
    assert np.array_equal(y.view(np.uint32), y_ort.view(np.uint32))
    assert np.array_equal(fmt.quantize_dequantize(x, s_b, zp_b), y)


@pytest.mark.parametrize("name", INT_FORMATS)
def test_symmetric_qparams(name: str) -> None:
    fmt = _int(name)
    lo = np.array([-2.0, -1.0, 0.0, -0.5], np.float32)
    hi = np.array([1.0, 3.0, 0.0, 0.0], np.float32)
    scale, zp = fmt.compute_qparams(lo, hi, symmetric=True)
    amax = np.array([2.0, 3.0, 0.0, 0.5])
    if fmt.signed:
        assert np.array_equal(zp, [0, 0, 0, 0])
        expected = amax / fmt.qmax
    else:  # unsigned: centred on the midpoint code
        mid = 1 << (fmt.bits - 1)
        assert np.array_equal(zp, [mid, mid, 0, mid])
        expected = amax / (fmt.qmax - mid)
    expected[2] = 1.0  # all-zero unit
    assert np.array_equal(scale, expected.astype(np.float32)) and scale.dtype == np.float32
    # the channel max lands exactly on the end code
    q = fmt.quantize(np.float32(3.0), scale[1], zp[1])
    assert q == fmt.qmax


@pytest.mark.parametrize("name", INT_FORMATS)
def test_asymmetric_qparams(name: str) -> None:
    fmt = _int(name)
    lo = np.array([-1.0, 2.0, -5.0, 0.0])
    hi = np.array([3.0, 4.0, -1.0, 0.0])
    scale, zp = fmt.compute_qparams(lo, hi, symmetric=False)
    span = np.array([4.0, 4.0, 5.0, 0.0])  # range widened to contain 0
    expected = (span / (fmt.qmax - fmt.qmin)).astype(np.float32)
    expected[3] = 1.0
    assert np.array_equal(scale, expected)
    lo0 = np.minimum(lo, 0)
    want_zp = np.clip(np.rint(fmt.qmin - lo0 / scale.astype(np.float64)), fmt.qmin, fmt.qmax)
    want_zp[3] = 0
    assert np.array_equal(zp, want_zp) and zp.dtype == fmt.storage_dtype
    # zero is exactly representable and the range ends map to the end codes
    assert np.all(fmt.quantize_dequantize(np.zeros(4, np.float32), scale, zp) == 0)
    q = fmt.quantize(np.stack([lo0, np.maximum(hi, 0)]).astype(np.float32), scale, zp)
    assert np.all(q[0, :3] == fmt.qmin) and np.all(q[1, :3] == fmt.qmax)


@pytest.mark.parametrize("name", INT_FORMATS)
def test_qparams_never_nan_or_zero(name: str) -> None:
    fmt = _int(name)
    lo = np.array([0.0, -1e-45, -3e38, 0.0], np.float32)
    hi = np.array([0.0, 1e-45, 3e38, 1e-40], np.float32)
    for symmetric in (True, False):
        scale, zp = fmt.compute_qparams(lo, hi, symmetric)
        assert np.isfinite(scale).all() and (scale > 0).all()
        assert (zp >= fmt.qmin).all() and (zp <= fmt.qmax).all()


def test_qparams_errors_name_the_tensor() -> None:
    fmt = _int("int8")
    with pytest.raises(FormatError, match="'conv1.weight'.*NaN/Inf"):
        fmt.compute_qparams(np.array([np.nan]), np.array([1.0]), True, name="conv1.weight")
    with pytest.raises(FormatError, match="NaN/Inf"):
        fmt.compute_qparams(0.0, np.inf, False)
    with pytest.raises(FormatError, match="lo > hi"):
        fmt.compute_qparams(2.0, 1.0, False)


def test_quantize_errors() -> None:
    fmt = _int("int4")
    with pytest.raises(FormatError, match="1 non-finite values in tensor 'w' \\(first at index \\(1,\\)\\)"):
        fmt.quantize(np.array([0.0, np.nan]), 1.0, 0, name="w")
    for bad_scale in (0.0, -1.0, np.nan):
        with pytest.raises(FormatError, match="scale"):
            fmt.quantize(np.ones(2), bad_scale, 0)
    with pytest.raises(FormatError, match="zero_point"):
        fmt.quantize(np.ones(2), 1.0, 8)
    with pytest.raises(FormatError, match="zero_point"):
        fmt.quantize(np.ones(2), 1.0, 0.5)


def test_int4_clips_instead_of_wrapping() -> None:
    """Spec: ml_dtypes.int4 casts wrap (9 -> -7); the codec clips first."""
    fmt = _int("int4")
    assert fmt.quantize(np.array([9.0, -9.0, 7.4, -8.6]), 1.0, 0).tolist() == [7, -8, 7, -8]
    assert _int("uint4").quantize(np.array([16.0, -1.0, 2.5, 3.5]), 1.0, 0).tolist() == [15, 0, 2, 4]
