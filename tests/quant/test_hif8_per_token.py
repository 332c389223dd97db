"""Per-token HiF8 activations (``emit_hif8_activation(scale=None)``): the signed-value rounding
(truncation through int32, NaN kept apart by QuantizeLinear's zero point) against the codec on
every grid value, midpoint (ties round away from zero), +-1 ulp around it, signed zeros and
subnormals, in rows whose scale is a power of two so that x / s is exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcomp import ir
from onnxcomp.formats import get_format
from onnxcomp.quant.activation_subgraphs import emit_hif8_activation
from onnxcomp.quant.hif8_subgraph import _hif8_token_reciprocal_step_table
from onnxcomp.testing import run_model

WIDTH = 64


def _model(relu: bool) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"])] if relu else []
    nodes.append(helper.make_node("Identity", ["r" if relu else "x"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "act",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", WIDTH])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    g = ir.import_model(model)
    reader = g.nodes[-1]  # the Identity (emitting appends nodes)
    reader.inputs[0] = emit_hif8_activation(g, reader.inputs[0], None, "h")
    ir.finalize(g)
    return ir.export_model(g, model)


def _rows(exponents: list[int]) -> np.ndarray:
    """Rows [+-16 * 2^k, 63 hard values * 2^k]: the row's amax is 16 * 2^k, so s = 2^k exactly."""
    values = get_format("hif8").values.astype(np.float64)
    values = values[np.isfinite(values) & (np.abs(values) <= 16)]
    mids = ((values[1:] + values[:-1]) / 2).astype(np.float32)
    hard = np.concatenate(
        [
            values.astype(np.float32),
            mids,
            np.nextafter(mids, np.float32(np.inf)),
            np.nextafter(mids, np.float32(-np.inf)),
            np.array(
                [0.0, -0.0, 2.0**-23, -(2.0**-23), 2.0**-24, 1e-45, -1e-45, 1e-40, 15.5, -15.5, 15.75], np.float32
            ),
        ]
    )
    hard = np.concatenate([hard, np.zeros((-len(hard)) % (WIDTH - 1), np.float32)]).reshape(-1, WIDTH - 1)
    lead = np.where(np.arange(len(hard)) % 2 == 0, 16.0, -16.0).astype(np.float32)[:, None]
    base = np.concatenate([lead, hard], axis=1)
    return np.concatenate([base * np.float32(2.0**k) for k in exponents]).astype(np.float32)


def _reference(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1, keepdims=True)
    s = np.maximum(amax / np.float32(16.0), np.finfo(np.float32).tiny).astype(np.float32)
    return get_format("hif8").quantize_dequantize(np.divide(x, s, dtype=np.float32)) * s


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("level", ["disable", "all"])
def test_signed_per_token_rounds_every_grid_point_and_tie_as_the_codec(level: str) -> None:
    x = _rows([-100, -3, 0, 7, 100])
    model = _model(relu=False)
    assert {"Log", "GatherElements"} <= {n.op_type for n in model.graph.node}
    got = run_model(model, {"x": x}, level=level)[0]
    want = _reference(x)
    bad = _bits(got) != _bits(want)
    assert not bad.any(), (int(bad.sum()), x[bad][:5], got[bad][:5], want[bad][:5])
    assert not np.signbit(got[want == 0]).any()  # HiF8 has no -0: every zero result is +0


def test_nonnegative_per_token_is_exact_and_never_negative_zero() -> None:
    x = _rows([-3, 0, 5])
    r = np.maximum(x, np.float32(0))
    got = run_model(_model(relu=True), {"x": x}, level="all")[0]
    want = _reference(r)
    assert (_bits(got) == _bits(want)).all()
    assert not np.signbit(got).any()


@pytest.mark.parametrize("relu", [False, True])
def test_a_nan_element_stays_nan(relu: bool) -> None:
    """NaN gets its own binade index (0), whose reciprocal step is NaN: the int32 cast (INT_MIN for
    NaN) divided by it is NaN again. (Other elements of that row depend on ReduceMax's NaN rule.)"""
    x = _rows([0])[:4].copy()
    x[:, 5] = np.nan
    got = run_model(_model(relu=relu), {"x": x}, level="all")[0]
    assert np.isnan(got[:, 5]).all()


def test_token_table_keeps_nan_apart() -> None:
    table = _hif8_token_reciprocal_step_table()
    assert np.isnan(table[0]) and table[1] == 2.0**22 and np.isfinite(table[1:]).all()
    # binade e = i - 126: 1 / step; 3 mantissa bits at e = 0 (step 1/8), 0 below 2^-15
    assert table[126] == 8.0 and table[126 - 20] == 2.0**20
