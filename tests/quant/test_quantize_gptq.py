"""GPTQ through the quantize pass: Hessians from the one calibration pass, record, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.api import quantize
from onnxcomp.errors import OnnxCompError
from onnxcomp.testing import run_model


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """Linear(64->48) + Relu + Conv-free Linear(48->16): inputs with a few dominant directions."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (64, 48)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (48, 16)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], "fc1"),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], "fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv(seed: int = 0, depthwise: bool = False) -> onnx.ModelProto:
    """One Conv (or one depthwise Conv: a Hessian block per group): GPTQ's guarantee is per layer."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.2, (8, 1, 3, 3) if depthwise else (16, 8, 3, 3)).astype(np.float32)
    attrs = {"group": 8} if depthwise else {}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], "conv", pads=[1, 1, 1, 1], **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8 if depthwise else 16, 10, 10])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _depthwise(seed: int = 0) -> onnx.ModelProto:
    return _conv(seed, depthwise=True)


def _correlated(shape: tuple[int, ...], seed: int, n: int = 4) -> list[dict[str, np.ndarray]]:
    """Samples ``seed`` of one distribution: a few dominant input directions (fixed mixing)."""
    c = shape[1] if len(shape) == 4 else shape[-1]
    mix = np.random.default_rng(99).normal(0, 1, (c, c)) * np.where(np.arange(c) < 4, 3.0, 0.2)[None, :]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        z = rng.normal(0, 1, shape).astype(np.float32)
        x = np.moveaxis(np.moveaxis(z, 1 if len(shape) == 4 else -1, -1) @ mix.T, -1, 1 if len(shape) == 4 else -1)
        if x.ndim == 4:  # neighbouring pixels correlated too (a depthwise conv's taps)
            x = x + np.roll(x, 1, axis=-1) + np.roll(x, 1, axis=-2)
        out.append({"x": x.astype(np.float32)})
    return out


@pytest.mark.parametrize(
    ("build", "shape", "settings"),
    [
        (_mlp, (32, 64), {"weights": "int4", "granularity": "group:32", "activations": "none"}),
        (_mlp, (32, 64), {"weights": "int4", "granularity": "channel", "activations": "uint8"}),
        (_mlp, (32, 64), {"weights": "fp4_e2m1", "activations": "none"}),
        (_mlp, (32, 64), {"weights": "mxfp4", "activations": "none", "weight_only_format": "dq"}),
        (_conv, (4, 8, 10, 10), {"weights": "int4", "granularity": "channel", "activations": "none"}),
        (_conv, (4, 8, 10, 10), {"weights": "int8", "activations": "uint8", "placement": "all"}),
        (
            _depthwise,
            (4, 8, 10, 10),
            {"weights": "int4", "granularity": "channel", "activations": "none", "placement": "all"},
        ),
    ],
)
def test_gptq_output_error_below_round_to_nearest(build, shape, settings) -> None:  # noqa: ANN001
    model = build()
    calib = _correlated(shape, 0)
    held = _correlated(shape, 1, 2)
    rtn = quantize(model, calibration=calib, fuse=False, reports=False, **settings)
    gptq = quantize(model, calibration=calib, fuse=False, reports=False, weight_algorithm="gptq", **settings)
    onnx.checker.check_model(gptq.model)
    err = {}
    for name, report in (("rtn", rtn), ("gptq", gptq)):
        err[name] = sum(
            float(np.sum((run_model(report.model, b)[0] - run_model(model, b)[0]) ** 2)) for b in calib + held
        )
    assert err["gptq"] < err["rtn"], err
    record = gptq.result("quantize").data["record"]
    assert all(e["weights"]["algorithm"]["name"] == "gptq" for e in record)


def test_gptq_is_deterministic_and_act_order_is_recorded() -> None:
    model, calib = _mlp(1), _correlated((32, 64), 2)
    kw = {"weights": "int4", "granularity": "group:32", "activations": "none", "fuse": False, "reports": False}
    a = quantize(model, calibration=calib, weight_algorithm="gptq", act_order=True, **kw)
    b = quantize(model, calibration=calib, weight_algorithm="gptq", act_order=True, **kw)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    algo = a.result("quantize").data["record"][0]["weights"]["algorithm"]
    assert algo == {"name": "gptq", "act_order": True, "damp": 0.01}


def test_gptq_needs_calibration_data() -> None:
    with pytest.raises(OnnxCompError, match="GPTQ needs calibration data"):
        quantize(_mlp(), weights="int4", activations="none", weight_algorithm="gptq", fuse=False)
