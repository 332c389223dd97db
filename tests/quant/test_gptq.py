"""GPTQ (``onnxcomp.quant.gptq``) and the Hessian machinery it stands on (``onnxcomp.calibration.gram``).

The design matrix of a layer times its flattened weight must be the layer's output as onnxruntime
computes it; the streamed, merged ``X^T X`` must equal one pass over all the data; the damped
inverse Cholesky factor must match a plain numpy reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import ir
from onnxcomp.calibration.gram import InputGram, damped_inverse_cholesky, design_rows, row_count
from onnxcomp.testing import run_model

# --- layers as single-node graphs --------------------------------------------------------------


def _layer(op: str, x_shape: tuple[int, ...], w: np.ndarray, **attrs: Any) -> tuple[onnx.ModelProto, ir.Node]:
    inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    node = helper.make_node(op, ["x", "W"], ["y"], name="layer", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = ir.import_model(model)
    return model, g.nodes[0]


def _flat(op: str, w: np.ndarray, **attrs: Any) -> np.ndarray:
    """The weight as (d, Cout): the matrix the design rows multiply."""
    if op == "Conv":
        return w.reshape(w.shape[0], -1).T
    if op == "Gemm" and attrs.get("transB", 0):
        return w.T
    return w


@pytest.mark.parametrize(
    ("op", "x_shape", "w_shape", "attrs"),
    [
        ("Conv", (2, 3, 7, 6), (4, 3, 3, 3), {"pads": [1, 0, 1, 2], "strides": [2, 1]}),
        ("Conv", (1, 2, 9, 9), (3, 2, 3, 2), {"dilations": [2, 1], "pads": [2, 0, 1, 1]}),
        ("Conv", (1, 2, 8, 7), (3, 2, 3, 2), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
        ("Gemm", (5, 6), (6, 4), {}),
        ("Gemm", (5, 6), (4, 6), {"transB": 1}),
        ("Gemm", (6, 5), (6, 4), {"transA": 1}),
        ("MatMul", (2, 3, 6), (6, 4), {}),
    ],
)
def test_design_rows_times_weight_is_the_layer_output(op: str, x_shape: tuple, w_shape: tuple, attrs: dict) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32)
    model, node = _layer(op, x_shape, w, **attrs)
    (y,) = run_model(model, {"x": x})
    index = np.arange(row_count(node, x.shape))
    got = design_rows(node, x, index) @ _flat(op, w, **attrs).astype(np.float64)
    want = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]) if op == "Conv" else y.reshape(-1, y.shape[-1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_grouped_conv_gets_one_block_per_group() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)  # group 3: 6 input channels, 2 per group
    x = rng.standard_normal((2, 6, 5, 5)).astype(np.float32)
    model, node = _layer("Conv", x.shape, w, group=3, pads=[1, 1, 1, 1])
    (y,) = run_model(model, {"x": x})
    gram = InputGram(node)
    gram.update(x)
    blocks = gram.blocks()
    assert blocks.shape == (3, 18, 18)
    rows = design_rows(node, x.astype(np.float64), np.arange(row_count(node, x.shape))).reshape(-1, 3, 18)
    for g in range(3):
        np.testing.assert_allclose(blocks[g], rows[:, g].T @ rows[:, g] / len(rows), rtol=1e-12)
        out = rows[:, g] @ w[2 * g : 2 * g + 2].reshape(2, -1).T
        np.testing.assert_allclose(out, np.moveaxis(y, 1, -1).reshape(-1, 6)[:, 2 * g : 2 * g + 2], atol=1e-4)
    with pytest.raises(Exception, match="groups"):
        gram.hessian()


def _conv_batches(count: int, dyadic: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    if dyadic:  # multiples of 1/8 in [-2, 2]: every float64 sum below is exact, in any order
        return [rng.integers(-16, 17, (2, 3, 6, 6)).astype(np.float32) / 8 for _ in range(count)]
    return [rng.standard_normal((2, 3, 6, 6)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("dyadic", [True, False])
def test_hessian_one_pass_equals_merged_halves_and_batching(dyadic: bool) -> None:
    w = np.zeros((4, 3, 3, 3), np.float32)
    _, node = _layer("Conv", (2, 3, 6, 6), w, pads=[1, 1, 1, 1])
    batches = _conv_batches(4, dyadic)
    whole = InputGram(node)
    for b in batches:
        whole.update(b)
    first, second = InputGram(node), InputGram(node)
    for b in batches[:2]:
        first.update(b)
    for b in batches[2:]:
        second.update(b)
    first.merge(second)
    single = InputGram(node)
    single.update(np.concatenate(batches))
    assert whole.rows == first.rows == single.rows == 4 * 2 * 36
    if dyadic:
        np.testing.assert_array_equal(first.hessian(), whole.hessian())
        np.testing.assert_array_equal(single.hessian(), whole.hessian())
    else:
        np.testing.assert_allclose(first.hessian(), whole.hessian(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(single.hessian(), whole.hessian(), rtol=1e-12, atol=1e-14)
    rows = design_rows(node, np.concatenate(batches), np.arange(whole.rows))
    np.testing.assert_allclose(whole.hessian(), rows.T @ rows / len(rows), rtol=1e-12, atol=1e-14)
    assert whole.hessian().dtype == np.float64 and whole.hessian().shape == (27, 27)


def test_row_subsampling_bounds_rows_and_is_seeded() -> None:
    w = np.zeros((4, 3, 3, 3), np.float32)
    _, node = _layer("Conv", (2, 3, 6, 6), w, pads=[1, 1, 1, 1])
    a, b = InputGram(node, max_rows=10, seed=5), InputGram(node, max_rows=10, seed=5)
    for x in _conv_batches(3, False):
        a.update(x)
        b.update(x)
    assert a.rows == 30
    np.testing.assert_array_equal(a.hessian(), b.hessian())


def _reference_inverse_cholesky(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    return np.linalg.inv(h), dead


def test_damped_inverse_cholesky_matches_reference_with_dead_columns() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 6)) @ rng.standard_normal((6, 6))
    x[:, 2] = 0.0  # a dead input
    h = x.T @ x / len(x)
    for damp in (0.0, 0.01, 0.5):
        u = damped_inverse_cholesky(h, damp)
        inverse, dead = _reference_inverse_cholesky(h, damp)
        assert dead.tolist() == [False, False, True, False, False, False]
        np.testing.assert_allclose(np.triu(u), u)
        np.testing.assert_allclose(u.T @ u, inverse, rtol=1e-9, atol=1e-12)
        assert (np.diag(u) > 0).all()
