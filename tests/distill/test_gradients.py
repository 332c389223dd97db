"""The numpy engine against onnxruntime (forward) and finite differences (every gradient)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcomp import ir
from onnxcomp.quant.distill.block import Tail, backward, backward_input, forward
from onnxcomp.quant.distill.clip import InputQuantizer
from onnxcomp.quant.distill.grid import grid_weight
from onnxcomp.quant.distill.rows import Layer, RowSource, layer_of
from onnxcomp.quant.distill.train import channel_weights_of, loss_and_grads
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
    _, grad_v, grad_log, grad_bias, _ = loss_and_grads(gw, v, log_scale, bias, rows, target, layer, tails, 1.0)

    def loss() -> float:
        return loss_and_grads(gw, v, log_scale, bias, rows, target, layer, tails, 1.0)[0]

    np.testing.assert_allclose(grad_v, _numeric(loss, v), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(grad_log, _numeric(loss, log_scale), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(grad_bias, _numeric(loss, bias), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_input_gradient_matches_finite_differences(case: str) -> None:
    """d loss / d input rows (what the learned input range's gradient flows through), every layer kind."""
    layer, x, w, y = _layer(case)
    source = RowSource(layer, x)
    index = np.random.default_rng(6).integers(0, source.count, 6)
    rows = np.ascontiguousarray(source.rows(index), np.float64)  # _numeric perturbs it in place
    target = source.targets(y, index).astype(np.float64) * 0.5
    matrix = layer.to_matrix(w.astype(np.float64))
    bias, tails = np.linspace(-0.3, 0.3, layer.out_channels), [Tail("HardSwish"), Tail("Clip", (-0.2, 2.0))]

    def loss() -> float:
        out, _ = forward(rows, matrix, bias, tails)
        return float(np.sum((out - target) ** 2))

    out, slopes = forward(rows, matrix, bias, tails)
    np.testing.assert_allclose(
        backward_input(2 * (out - target), slopes, matrix), _numeric(loss, rows), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("dtype,symmetric", [("uint8", False), ("int8", True), ("fp8_e4m3", True)])
def test_input_range_gradient_matches_finite_differences(dtype: str, symmetric: bool) -> None:
    """LSQ's gradient of the input range's log-gain, through a Conv and its tail.

    The straight-through estimator is the exact derivative of the quantizer with its rounding
    error frozen and scaled with the step (LSQ's model): ``x + e g`` inside the representable
    interval, the clipped end ``x' g`` outside. Finite differences of the loss through that
    surrogate must equal what ``loss_and_grads`` returns; on clipped elements the surrogate is
    the quantizer itself, checked too.
    """
    layer, x, w, y = _layer("conv3x3_stride2_pad")
    x = x * 2.0  # some inputs beyond the range: clipped elements
    source = RowSource(layer, x)
    rows = source.rows(np.arange(source.count)[:24]).astype(np.float64)
    target = source.targets(y, np.arange(source.count)[:24]).astype(np.float64)
    spec = TensorSpec("int4", Granularity("channel", 0), True, "minmax")
    qw = quantize_weight(w, spec, ir.weight_layout("Conv", 4))
    gw = grid_weight(w, qw)
    assert not isinstance(gw, str)
    v, log_scale = gw.initial_v().astype(np.float64), np.zeros(np.shape(gw.scale0))
    iq = InputQuantizer(dtype, -2.5 if not symmetric else -3.0, 3.0, symmetric, learn=True)
    a0 = 0.07
    xq, d_x, d_gain = iq.fake_and_grads(rows, a0)
    clipped = d_x == 0
    assert 0 < clipped.mean() < 0.5
    np.testing.assert_allclose(d_gain, np.where(clipped, xq, xq - rows), rtol=1e-6, atol=1e-6)
    eps = 1e-4
    numeric_clip = (iq.fake(rows, a0 + eps) - iq.fake(rows, a0 - eps)) / (2 * eps)
    np.testing.assert_allclose(numeric_clip[clipped], d_gain[clipped], rtol=2e-3, atol=1e-5)
    weights = channel_weights_of(target)
    tails = [Tail("Relu")]

    def loss_at(a: float) -> float:
        g = np.exp(a - a0)
        rows_a = np.where(clipped, xq * g, rows + (xq - rows) * g)
        return loss_and_grads(gw, v, log_scale, None, rows_a, target, layer, tails, 1.0, weights)[0]

    got = loss_and_grads(
        gw, v, log_scale, None, xq.astype(np.float64), target, layer, tails, 1.0, weights, (d_x, d_gain)
    )
    numeric = (loss_at(a0 + 1e-6) - loss_at(a0 - 1e-6)) / 2e-6
    assert got[4] == pytest.approx(numeric, rel=1e-4)


def test_channel_weighted_loss_gradients_match_finite_differences() -> None:
    layer, x, w, y = _layer("conv_grouped_dilated")
    source = RowSource(layer, x)
    index = np.arange(min(source.count, 20))
    rows, target = source.rows(index).astype(np.float64), source.targets(y, index).astype(np.float64)
    target[:, 0] *= 0.01  # a quiet channel: weighted 100x more than the others
    weights = channel_weights_of(target)
    assert weights.mean() == pytest.approx(1.0) and weights[0] > 10 * np.median(weights)
    spec = TensorSpec("int4", Granularity("channel", 0), True, "minmax")
    gw = grid_weight(w, quantize_weight(w, spec, ir.weight_layout("Conv", 4)))
    assert not isinstance(gw, str)
    v = np.random.default_rng(7).normal(0, 1, gw.shape)
    log_scale = np.random.default_rng(8).normal(0, 0.05, np.shape(gw.scale0))
    bias = np.linspace(-0.1, 0.1, layer.out_channels)

    def loss() -> float:
        return loss_and_grads(gw, v, log_scale, bias, rows, target, layer, [Tail("Tanh")], 1.0, weights)[0]

    _, grad_v, grad_log, grad_bias, _ = loss_and_grads(
        gw, v, log_scale, bias, rows, target, layer, [Tail("Tanh")], 1.0, weights
    )
    np.testing.assert_allclose(grad_v, _numeric(loss, v), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(grad_log, _numeric(loss, log_scale), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(grad_bias, _numeric(loss, bias), rtol=1e-4, atol=1e-8)
