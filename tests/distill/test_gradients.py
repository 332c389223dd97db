"""The numpy engine against onnxruntime (forward) and finite differences (every gradient)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcomp import ir
from onnxcomp.quant.distill.block import Tail, backward, forward
from onnxcomp.quant.distill.grid import grid_weight
from onnxcomp.quant.distill.rows import Layer, RowSource, layer_of
from onnxcomp.quant.distill.train import loss_and_grads
from onnxcomp.quant.spec import Granularity, TensorSpec
from onnxcomp.quant.weights import quantize_weight
from onnxcomp.runtime import ort_session

#: (op, input shape, weight shape, attributes)
LAYERS = {
    "conv3x3_stride2_pad": ("Conv", (2, 4, 9, 8), (6, 4, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 1]}),
    "conv_grouped_dilated": ("Conv", (2, 4, 8, 8), (6, 2, 3, 2), {"group": 2, "dilations": [2, 1]}),
    "conv_depthwise": ("Conv", (2, 4, 7, 7), (4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    "conv1d": ("Conv", (2, 3, 11), (5, 3, 3), {"strides": [2], "pads": [1, 1]}),
    "convtranspose": ("ConvTranspose", (2, 4, 5, 4), (4, 3, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 1]}),
    "convtranspose_grouped": (
        "ConvTranspose",
        (2, 4, 4, 5),
        (4, 2, 2, 3),
        {"group": 2, "strides": [2, 1], "output_padding": [1, 0]},
    ),
    "gemm_transB": ("Gemm", (5, 6), (7, 6), {"transB": 1}),
    "gemm": ("Gemm", (5, 6), (6, 7), {}),
    "matmul_3d": ("MatMul", (2, 3, 6), (6, 5), {}),
}


def _layer_model(op: str, x_shape: tuple[int, ...], w: np.ndarray, attrs: dict) -> onnx.ModelProto:  # type: ignore[type-arg]
    node = helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _layer(case: str) -> tuple[Layer, np.ndarray, np.ndarray, np.ndarray]:
    op, x_shape, w_shape, attrs = LAYERS[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    model = _layer_model(op, x_shape, w, attrs)
    y = ort_session(model, level="disable").run(None, {"x": x})[0]
    node = next(n for n in ir.import_model(model).nodes if n.name == "layer")
    layer = layer_of(node, w_shape)
    assert isinstance(layer, Layer)
    return layer, x, w, y


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_rows_reproduce_onnxruntime(case: str) -> None:
    layer, x, w, y = _layer(case)
    source = RowSource(layer, x)
    every = np.arange(source.count)
    out, _ = forward(source.rows(every).astype(np.float64), layer.to_matrix(w.astype(np.float64)), None, [])
    assert source.targets(y, every).shape == out.shape
    np.testing.assert_allclose(source.assemble(out, x.shape[0]).reshape(y.shape), y, rtol=1e-5, atol=1e-5)
    # the matrix view is a permutation: from_matrix inverts to_matrix
    np.testing.assert_array_equal(layer.from_matrix(layer.to_matrix(w)), w)


def _numeric(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:  # noqa: ANN001
    grad = np.zeros_like(x)
    flat, out = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        up = f()
        flat[i] = keep - eps
        down = f()
        flat[i] = keep
        out[i] = (up - down) / (2 * eps)
    return grad


TAILS = [
    Tail("Relu"),
    Tail("LeakyRelu", (0.1,)),
    Tail("Clip", (-0.5, 1.5)),
    Tail("HardSigmoid", (0.2, 0.5)),
    Tail("HardSwish"),
    Tail("Sigmoid"),
    Tail("Tanh"),
    Tail("Gelu", mode="none"),
    Tail("Gelu", mode="tanh"),
]


@pytest.mark.parametrize("tail", TAILS, ids=lambda t: f"{t.op}{t.mode}")
def test_tail_derivative_matches_finite_differences(tail: Tail) -> None:
    y = np.random.default_rng(1).uniform(-4, 4, 200)
    y = y[np.all(np.abs(y[:, None] - np.array([-3, -0.5, 0, 1.5, -2.5, 2.5, 3])) > 1e-3, axis=1)]  # off the kinks
    _, d = tail.forward(y)
    eps = 1e-6
    numeric = (tail.forward(y + eps)[0] - tail.forward(y - eps)[0]) / (2 * eps)
    np.testing.assert_allclose(d, numeric, rtol=1e-5, atol=1e-6)


def test_gelu_matches_the_exact_erf() -> None:
    import math

    y = np.linspace(-5, 5, 101)
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in y])
    np.testing.assert_allclose(Tail("Gelu", mode="none").forward(y)[0], exact, atol=1e-6)


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_layer_gradients_match_finite_differences(case: str) -> None:
    layer, x, w, y = _layer(case)
    source = RowSource(layer, x)
    index = np.random.default_rng(2).integers(0, source.count, 12)
    rows = source.rows(index).astype(np.float64)
    target = source.targets(y, index).astype(np.float64) * 0.5
    w64, bias = w.astype(np.float64), np.linspace(-0.3, 0.3, layer.out_channels)
    tails = [Tail("HardSwish"), Tail("Clip", (-0.2, 2.0))]

    def loss() -> float:
        out, _ = forward(rows, layer.to_matrix(w64), bias, tails)
        return float(np.sum((out - target) ** 2))

    out, slopes = forward(rows, layer.to_matrix(w64), bias, tails)
    grad_matrix, grad_bias = backward(2 * (out - target), rows, slopes, layer.group)
    np.testing.assert_allclose(layer.from_matrix(grad_matrix), _numeric(loss, w64), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_bias, _numeric(loss, bias), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "dtype,granularity", [("int4", "channel"), ("int8", "tensor"), ("fp4_e2m1", "group:32"), ("mxfp4", "group:32")]
)
def test_rounding_and_scale_gradients_match_finite_differences(dtype: str, granularity: str) -> None:
    layer, x, w, y = _layer("conv3x3_stride2_pad") if granularity != "group:32" else _layer("gemm_transB")
    if granularity == "group:32":  # a reduction axis long enough for two groups
        rng = np.random.default_rng(3)
        w = rng.standard_normal((4, 40)).astype(np.float32)
        x = rng.standard_normal((6, 40)).astype(np.float32)
        layer = Layer("Gemm", (4, 40), transposed_weight=True)
        y = x @ w.T
    kind, _, size = granularity.partition(":")
    spec = TensorSpec(dtype, Granularity(kind, int(size) if size else 0), True, "minmax")
    qw = quantize_weight(w, spec, ir.weight_layout(layer.op, w.ndim, layer.transposed_weight))
    gw = grid_weight(w, qw)
    assert not isinstance(gw, str), gw
    source = RowSource(layer, x)
    index = np.arange(min(source.count, 16))
    rows = source.rows(index).astype(np.float64)
    target = source.targets(y, index).astype(np.float64)
    v = np.random.default_rng(4).normal(0, 1, gw.shape)
    log_scale = np.random.default_rng(5).normal(0, 0.05, np.shape(gw.scale0))
    bias = np.linspace(-0.1, 0.1, layer.out_channels)
    tails = [Tail("Relu")]
    _, grad_v, grad_log, grad_bias = loss_and_grads(gw, v, log_scale, bias, rows, target, layer, tails, 1.0)

    def loss() -> float:
        return loss_and_grads(gw, v, log_scale, bias, rows, target, layer, tails, 1.0)[0]

    np.testing.assert_allclose(grad_v, _numeric(loss, v), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(grad_log, _numeric(loss, log_scale), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(grad_bias, _numeric(loss, bias), rtol=1e-4, atol=1e-8)
