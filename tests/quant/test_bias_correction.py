"""Bias correction: the mean output error of every quantized layer is zero on the calibration set."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.api import quantize
from onnxcomp.calibration.collect import collect_many
from onnxcomp.calibration.moments import ChannelMean
from onnxcomp.errors import OnnxCompError
from onnxcomp.runtime import with_outputs
from onnxcomp.testing import run_model


def _conv_model(seed: int = 0) -> onnx.ModelProto:
    """Conv(bias) -> Relu -> Conv(no bias) -> Conv(bias): badly scaled weights, so rounding shifts means."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(0, 0.3, (8, 3, 3, 3)) + 0.05).astype(np.float32)
    b1 = rng.normal(0, 0.1, 8).astype(np.float32)
    w2 = (rng.normal(0, 0.2, (8, 8, 3, 3)) * rng.uniform(0.02, 1.0, (8, 1, 1, 1))).astype(np.float32)
    w3 = rng.normal(0, 0.2, (4, 8, 1, 1)).astype(np.float32)
    b3 = rng.normal(0, 0.1, 4).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"), (b3, "b3"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w3", "b3"], ["y"], "conv3"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matmul_model(seed: int = 0) -> onnx.ModelProto:
    """MatMul -> Add(bias) -> Relu -> MatMul (no bias) -> graph output."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(0, 0.3, (16, 24)) + 0.02).astype(np.float32)
    b1 = rng.normal(0, 0.1, 24).astype(np.float32)
    w2 = (rng.normal(0, 0.3, (24, 8)) * rng.uniform(0.05, 1.0, (1, 8))).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], "mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], "add1"),
        helper.make_node("Relu", ["a1"], ["r1"], "relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], "mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _means(
    model: onnx.ModelProto, names: dict[str, int], batches: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    wanted = {"m": {n: (lambda a=a: ChannelMean(a)) for n, a in names.items()}}
    filled = collect_many(model, wanted, batches)["m"]
    return {n: c.mean() for n, c in filled.items()}  # type: ignore[attr-defined]


def _batches(shape: tuple[int, ...], seed: int, n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.normal(0.2, 1.0, shape)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize(
    ("build", "shape", "outputs", "weights", "activations"),
    [
        (_conv_model, (4, 3, 8, 8), {"c1": 1, "c2": 1, "y": 1}, "int4", "uint8"),
        (_conv_model, (4, 3, 8, 8), {"c1": 1, "c2": 1, "y": 1}, "int8", "uint8"),
        (_matmul_model, (32, 16), {"a1": -1, "y": -1}, "int4", "none"),
        (_matmul_model, (32, 16), {"a1": -1, "y": -1}, "int4", "uint8"),
    ],
)
def test_full_correction_zeroes_mean_output_error(build, shape, outputs, weights, activations) -> None:  # noqa: ANN001
    model = build()
    calib = _batches(shape, 0)
    ref = _means(model, outputs, calib)
    kw = {"weights": weights, "activations": activations, "granularity": "channel", "fuse": False, "placement": "all"}
    before = quantize(model, calibration=calib, reports=False, **kw).model
    after = quantize(model, calibration=calib, reports=False, bias_correction="full", **kw).model
    onnx.checker.check_model(after)
    err_before = {n: m - ref[n] for n, m in _means(before, outputs, calib).items()}
    err_after = {n: m - ref[n] for n, m in _means(after, outputs, calib).items()}
    for name in outputs:
        scale = float(np.abs(ref[name]).max()) + 1e-3
        # zero up to the int32 bias rounding (half a step of s_x * s_w) and float32 sums
        assert np.abs(err_after[name]).max() <= 2e-3 * scale, (name, err_after[name], err_before[name])
    worst_before = max(float(np.abs(e).max()) for e in err_before.values())
    assert worst_before > 10 * max(float(np.abs(e).max()) for e in err_after.values())


def test_fast_variant_reduces_error_and_record_says_where() -> None:
    model = _conv_model(1)
    calib = _batches((4, 3, 8, 8), 1)
    report = quantize(
        model,
        calibration=calib,
        weights="int4",
        granularity="channel",
        fuse=False,
        bias_correction="fast",
        placement="all",
    )
    record = {e["node"]: e for e in report.result("quantize").data["record"]}
    sites = {n: record[n]["bias_correction"]["site"] for n in ("conv1", "conv2", "conv3")}
    assert sites == {"conv1": "bias", "conv2": "new bias", "conv3": "bias"}  # int4 x uint8: float biases
    assert all(record[n]["bias_correction"]["variant"] == "fast" for n in sites)
    ref = _means(model, {"y": 1}, calib)["y"]
    base = quantize(
        model, calibration=calib, weights="int4", granularity="channel", fuse=False, reports=False, placement="all"
    )
    fixed = np.abs(_means(report.model, {"y": 1}, calib)["y"] - ref).max()
    plain = np.abs(_means(base.model, {"y": 1}, calib)["y"] - ref).max()
    assert fixed < plain


def test_new_int32_bias_keeps_the_integer_kernel(tmp_path) -> None:  # noqa: ANN001
    """conv2 has no bias: the created one is int32, so onnxruntime still runs QLinearConv."""
    model = _conv_model(2)
    calib = _batches((4, 3, 8, 8), 2)
    report = quantize(model, calibration=calib, fuse=False, bias_correction="full", placement="all")
    record = {e["node"]: e for e in report.result("quantize").data["record"]}
    assert record["conv2"]["bias_correction"]["site"] == "new int32 bias"
    kernels = report.result("quantize").data["kernels"]
    assert kernels["float"] == 0 and kernels["integer"] == 3, kernels["nodes"]
    x = calib[0]
    y_q = run_model(report.model, x)[0]
    y_f = run_model(model, x)[0]
    assert np.abs(y_q - y_f).max() < 0.1 * np.abs(y_f).max()


def test_needs_calibration_data() -> None:
    with pytest.raises(OnnxCompError, match="bias correction needs calibration data"):
        quantize(_matmul_model(), weights="int8", activations="none", bias_correction="full", fuse=False)


def test_levels_follow_quantized_depth() -> None:
    model = _conv_model(3)
    calib = _batches((4, 3, 8, 8), 3)
    report = quantize(model, calibration=calib, fuse=False, bias_correction="full", reports=False, placement="all")
    levels = {e["node"]: e["bias_correction"]["level"] for e in report.result("quantize").data["record"]}
    assert levels == {"conv1": 0, "conv2": 1, "conv3": 2}
    exposed = with_outputs(report.model, ["c1"])
    assert any(o.name == "c1" for o in exposed.graph.output)


def test_channel_mean_one_pass_several_batches_and_merged_halves_agree() -> None:
    rng = np.random.default_rng(0)
    data = [rng.normal(0.3, 1, (3, 5, 4, 4)).astype(np.float32) for _ in range(6)]
    one = ChannelMean(1)
    one.update(np.concatenate(data))
    several = ChannelMean(1)
    for x in data:
        several.update(x)
    halves = [ChannelMean(1), ChannelMean(1)]
    for i, x in enumerate(data):
        halves[i % 2].update(x)
    halves[0].merge(halves[1])
    ref = np.concatenate(data).astype(np.float64).mean(axis=(0, 2, 3))
    for c in (one, several, halves[0]):
        assert c.count == 6 * 3 * 16
        np.testing.assert_allclose(c.mean(), ref, rtol=1e-12, atol=1e-12)
