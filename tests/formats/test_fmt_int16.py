"""INT16 / UINT16 codecs (docs/formats.md#integer-formats): every code, a brute-force reference, onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import FormatError
from onnxcomp.formats import IntegerFormat, get_format
from onnxcomp.quant.spec import Granularity, TensorSpec
from onnxcomp.quant.weights import min_opset_for
from onnxcomp.runtime import ort_session

WIDE = {"int16": (-32768, 32767, np.int16, TensorProto.INT16), "uint16": (0, 65535, np.uint16, TensorProto.UINT16)}


def _codec(name: str) -> IntegerFormat:
    fmt = get_format(name)
    assert isinstance(fmt, IntegerFormat)
    return fmt


def _reference_codes(x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """ONNX QuantizeLinear written out element by element: float32 quotient, Python's round (ties to even), clip."""
    quotients = (np.asarray(x, np.float32) / np.float32(scale)).astype(np.float32)
    return np.array([min(max(round(float(v)) + zero_point, qmin), qmax) for v in quotients], np.int64)


@pytest.mark.parametrize("name", list(WIDE))
def test_registry_entry(name: str) -> None:
    qmin, qmax, storage, onnx_dtype = WIDE[name]
    fmt = _codec(name)
    assert (fmt.bits, fmt.kind, fmt.qmin, fmt.qmax, fmt.storage_dtype, fmt.onnx_dtype) == (
        16,
        "int",
        qmin,
        qmax,
        np.dtype(storage),
        onnx_dtype,
    )


@pytest.mark.parametrize("name", list(WIDE))
@pytest.mark.parametrize(("scale", "zero_point"), [(1.0, 0), (0.0123, 0), (3.5e-5, 1000)])
def test_every_code_round_trips(name: str, scale: float, zero_point: int) -> None:
    fmt = _codec(name)
    qmin, qmax, storage, _ = WIDE[name]
    zp = np.asarray(zero_point if fmt.signed else abs(zero_point), storage)
    codes = np.arange(qmin, qmax + 1, dtype=np.int64).astype(storage)
    assert codes.size == 65536
    values = fmt.dequantize(codes, scale, zp)
    expect = ((codes.astype(np.int64) - int(zp)).astype(np.float32) * np.float32(scale)).astype(np.float32)
    np.testing.assert_array_equal(values, expect)
    again = fmt.quantize(values, scale, zp)
    assert again.dtype == storage
    np.testing.assert_array_equal(again, codes)


@pytest.mark.parametrize("name", list(WIDE))
def test_every_tie_rounds_to_even_and_the_ends_clip(name: str) -> None:
    fmt = _codec(name)
    qmin, qmax, _, _ = WIDE[name]
    ties = np.arange(qmin, qmax, dtype=np.float64) + 0.5  # every half-way point between two codes
    codes = fmt.quantize(ties.astype(np.float32), 1.0).astype(np.int64)
    lower = np.floor(ties).astype(np.int64)
    np.testing.assert_array_equal(codes, np.where(lower % 2 == 0, lower, lower + 1))
    beyond = np.array([qmin - 1, qmin - 1e6, qmax + 1, qmax + 1e6, 3.0e38, -3.0e38], np.float32)
    np.testing.assert_array_equal(fmt.quantize(beyond, 1.0), [qmin, qmin, qmax, qmax, qmax, qmin])


@pytest.mark.parametrize("name", list(WIDE))
def test_random_values_match_the_element_by_element_reference(name: str) -> None:
    fmt = _codec(name)
    qmin, qmax, storage, _ = WIDE[name]
    rng = np.random.default_rng(16)
    x = (rng.standard_normal(20000) * 4).astype(np.float32)
    for scale, zp in ((2.0**-12, 0 if fmt.signed else 32768), (1.7e-4, 123), (0.37, -5 if fmt.signed else 7)):
        got = fmt.quantize(x, scale, np.asarray(zp, storage)).astype(np.int64)
        np.testing.assert_array_equal(got, _reference_codes(x, scale, zp, qmin, qmax))


def test_qparams_follow_the_integer_rules() -> None:
    int16, uint16 = _codec("int16"), _codec("uint16")
    scale, zp = int16.compute_qparams(-2.0, 1.0, symmetric=True)
    assert scale == np.float32(2.0 / 32767) and zp == 0 and zp.dtype == np.int16
    scale, zp = uint16.compute_qparams(-2.0, 1.0, symmetric=True)
    assert scale == np.float32(2.0 / 32767) and zp == 32768 and zp.dtype == np.uint16
    scale, zp = uint16.compute_qparams(-1.0, 3.0, symmetric=False)
    assert scale == np.float32(4.0 / 65535) and int(zp) == round(1.0 / float(scale))
    assert uint16.quantize(np.float32([3.0, -1.0]), scale, zp).tolist() == [65535, 0]
    with pytest.raises(FormatError, match="int16: zero_point must be integers in \\[-32768, 32767\\]"):
        int16.quantize([1.0], 1.0, np.int32(40000))
    with pytest.raises(FormatError, match="'w'"):
        int16.quantize([np.nan], 1.0, name="w")


@pytest.mark.parametrize("name", list(WIDE))
def test_opset_21_is_required(name: str) -> None:
    assert min_opset_for(TensorSpec(name, Granularity("tensor"))) == 21
    assert min_opset_for(TensorSpec(name, Granularity("channel"))) == 21


def _qdq_model(onnx_dtype: int, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> onnx.ModelProto:
    attrs = {} if axis is None else {"axis": axis}
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
        ],
        "qdq16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, None])],
        [
            helper.make_tensor_value_info("q", onnx_dtype, [None, None, None]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None]),
        ],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("name", list(WIDE))
@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("level", ["disable", "all"])
def test_onnxruntime_quantize_dequantize_are_bit_exact(name: str, axis: int | None, level: str) -> None:
    fmt = _codec(name)
    _, _, storage, onnx_dtype = WIDE[name]
    rng = np.random.default_rng(21)
    x = (rng.standard_normal((64, 8, 40)) * rng.uniform(0.1, 30, (1, 8, 1))).astype(np.float32)
    x[0, 0, :6] = [0.5, 1.5, -2.5, 1e30, -1e30, 0.0]
    if axis is None:
        scale, zp = fmt.compute_qparams(float(x[1:].min()), float(x[1:].max()), symmetric=False)
        s_b, z_b = scale, zp
    else:
        lo, hi = x.min(axis=(0, 2)), x.max(axis=(0, 2))
        scale, zp = fmt.compute_qparams(lo, hi, symmetric=not fmt.signed)
        s_b, z_b = scale.reshape(1, -1, 1), zp.reshape(1, -1, 1)
    session = ort_session(_qdq_model(onnx_dtype, scale, zp, axis), level=level)
    q, y = session.run(None, {"x": x})
    codes = fmt.quantize(x, s_b, z_b)
    assert q.dtype == storage
    np.testing.assert_array_equal(q, codes)
    np.testing.assert_array_equal(y.view(np.uint32), fmt.dequantize(codes, s_b, z_b).view(np.uint32))
