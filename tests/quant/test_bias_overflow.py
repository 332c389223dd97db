"""An int32 bias that would overflow (tiny weight scale, non-zero bias) is fixed, never clipped."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.api import quantize
from onnxcomp.testing import run_model


def _model(tiny: float) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    w[2] = tiny * np.sign(w[2])  # a nearly dead channel: its weight scale is ~tiny / 127
    b = np.array([0.1, -0.2, 3.0, 0.05], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], "conv", pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _int32_bias(model: onnx.ModelProto) -> np.ndarray:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return next(v for v in inits.values() if v.dtype == np.int32 and v.ndim == 1)


def test_overflowing_bias_raises_the_channel_scale_and_stays_exact() -> None:
    model = _model(1e-12)
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    report = quantize(model, calibration={"x": x}, fuse=False, placement="all")
    entry = report.result("quantize").data["record"][0]
    assert entry["bias"] == "int32" and entry["bias_overflow"]["channels"] == [2]
    codes = _int32_bias(report.model)
    assert np.abs(codes.astype(np.int64)).max() <= 2**30  # fits, with room for bias correction
    y_q, y_f = run_model(report.model, {"x": x})[0], run_model(model, {"x": x})[0]
    # channel 2 is (almost) its bias, 3.0 up to the output's uint8 step (a clipped int32 gives ~0)
    assert np.abs(y_q[:, 2] - 3.0).max() < 0.03
    assert np.abs(y_q - y_f).max() < 0.05 * np.abs(y_f).max()


def test_ordinary_biases_are_untouched() -> None:
    model = _model(0.3)
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    entry = quantize(model, calibration={"x": x}, fuse=False, placement="all").result("quantize").data["record"][0]
    assert entry["bias"] == "int32" and "bias_overflow" not in entry
