"""lower_batchnorm: a BN that cannot be folded becomes Mul + Add with per-channel constants."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_models import (
    bn_node,
    bn_params,
    check_pass,
    counts,
    initializer,
    model,
    rng,
)
from onnx import helper, numpy_helper

PASS = "lower_batchnorm"


@pytest.mark.parametrize("shape", [[2, 4], [2, 4, 7], [2, 4, 3, 5], [2, 4, 2, 3, 2]], ids=["2d", "3d", "4d", "5d"])
def test_bn_after_relu_becomes_mul_add(shape: list[int]) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y", "bn")]
    src = model(nodes, {"x": shape}, {"y": shape}, bn_params(rng(len(shape)), "bn", 4))
    m, result = check_pass(src, PASS)
    assert counts(m) == {"Relu": 1, "Mul": 1, "Add": 1}
    assert result.stats["lowered"] == 1
    mul = next(n for n in m.graph.node if n.op_type == "Mul")
    assert initializer(m, mul.input[1]).shape == (4,) + (1,) * (len(shape) - 2)
    assert m.graph.output[0].name == "y"


def test_float16_input_keeps_dtype() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y", "bn")]
    src = model(
        nodes, {"x": [2, 4, 3, 3]}, {"y": [2, 4, 3, 3]}, bn_params(rng(1), "bn", 4, np.float16), dtype=np.float16
    )
    m, _ = check_pass(src, PASS, rtol=1e-2, atol=1e-2)
    assert {t.data_type for t in m.graph.initializer} == {10}  # FLOAT16


def _squeezed_bn():
    # Squeeze's axes come through an Identity: shape inference (no data propagation) cannot tell
    # the output rank.
    nodes = [
        helper.make_node("Identity", ["axes"], ["axes_id"]),
        helper.make_node("Squeeze", ["x", "axes_id"], ["r"]),
        bn_node("r", "y", "bn"),
    ]
    inits = [*bn_params(rng(2), "bn", 4), numpy_helper.from_array(np.array([4], np.int64), "axes")]
    return model(nodes, {"x": [2, 4, 3, 3, 1]}, {"y": [2, 4, 3, 3]}, inits)


@pytest.mark.parametrize("infer_shapes", [True, False])
def test_unknown_rank_declines(infer_shapes: bool) -> None:
    m, result = check_pass(_squeezed_bn(), PASS, modified=False, infer_shapes=infer_shapes)
    assert counts(m)["BatchNormalization"] == 1
    assert "rank of its input 'r' is unknown" in result.declined[0][1]


def test_rank_from_shape_inference() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y", "bn")]
    src = model(nodes, {"x": [2, 4, 3]}, {"y": [2, 4, 3]}, bn_params(rng(4), "bn", 4))
    _, result = check_pass(src, PASS, infer_shapes=False, modified=False)
    assert "unknown" in result.declined[0][1]
    m, _ = check_pass(src, PASS)
    assert counts(m) == {"Relu": 1, "Mul": 1, "Add": 1}


@pytest.mark.parametrize(
    ("attrs", "outputs", "reason"),
    [({"training_mode": 1}, ("y", "rm", "rv"), "training_mode=1"), ({}, ("y",), "not a constant")],
    ids=["training", "scale_is_input"],
)
def test_declines(attrs: dict, outputs: tuple[str, ...], reason: str) -> None:
    names = [f"bn_{p}" for p in ("scale", "B", "mean", "var")]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("BatchNormalization", ["r", *names], list(outputs), name="bn", **attrs),
    ]
    inputs = {"x": [2, 4, 3, 3]}
    params = bn_params(rng(3), "bn", 4)
    if not attrs:
        inputs["bn_scale"] = [4]
        params = params[1:]
    m, result = check_pass(model(nodes, inputs, {"y": [2, 4, 3, 3]}, params), PASS, modified=False)
    assert counts(m)["BatchNormalization"] == 1
    assert reason in result.declined[0][1]
