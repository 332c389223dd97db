"""fuse_matmul_add: MatMul(2-D X, constant W) + constant bias -> Gemm, keeping the output name."""

from __future__ import annotations

import pytest
from fusion_models import check_pass, counts, model, randn, rng
from onnx import helper, numpy_helper

PASS = "fuse_matmul_add"


def _matmul_add(
    x_shape: list[int] | None, bias_shape: list[int], bias_first: bool = False, relu: bool = False, extra: bool = False
):
    r = rng(len(bias_shape))
    inits = [randn(r, "W", [4, 5]), randn(r, "bias", bias_shape)]
    nodes = [helper.make_node("Relu", ["x"], ["xr"])] if relu else []
    nodes.append(helper.make_node("MatMul", ["xr" if relu else "x", "W"], ["mm"], name="matmul"))
    nodes.append(helper.make_node("Add", ["bias", "mm"] if bias_first else ["mm", "bias"], ["y"], name="add"))
    outputs = {"y": [*x_shape[:-1], 5]}
    if extra:
        nodes.append(helper.make_node("Relu", ["mm"], ["r"], name="relu"))
        outputs["r"] = outputs["y"]
    return model(nodes, {"x": x_shape}, outputs, inits)


@pytest.mark.parametrize("bias_first", [False, True], ids=["mm_bias", "bias_mm"])
@pytest.mark.parametrize("bias_shape", [[5], [1, 5], []], ids=["N", "1N", "scalar"])
def test_becomes_gemm(bias_shape: list[int], bias_first: bool) -> None:
    m, result = check_pass(_matmul_add([3, 4], bias_shape, bias_first), PASS)
    assert counts(m) == {"Gemm": 1}
    (gemm,) = m.graph.node
    assert list(gemm.output) == ["y"] and gemm.name == "matmul"
    assert list(gemm.input) == ["x", "W", "bias"]
    assert result.stats["fused"] == 1


def test_rank_from_shape_inference() -> None:
    m, _ = check_pass(_matmul_add([3, 4], [5], relu=True), PASS)
    assert counts(m) == {"Relu": 1, "Gemm": 1}
    m, result = check_pass(_matmul_add([3, 4], [5], relu=True), PASS, modified=False, infer_shapes=False)
    assert "unknown" in result.declined[0][1]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"x_shape": [2, 3, 4], "bias_shape": [5]}, "is 3-D; Gemm needs 2-D"),
        ({"x_shape": [3, 4], "bias_shape": [3, 5]}, "not (5,), (1, 5) or a scalar"),
        ({"x_shape": [3, 4], "bias_shape": [5], "extra": True}, "also feeds relu"),
    ],
    ids=["3d_input", "full_bias", "matmul_output_used"],
)
def test_declines(kwargs: dict, reason: str) -> None:
    m, result = check_pass(_matmul_add(**kwargs), PASS, modified=False)
    assert counts(m)["MatMul"] == 1
    assert reason in result.declined[0][1], result.declined


def test_weight_not_constant_declines() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["y"], name="add")]
    inits = [numpy_helper.from_array(rng(1).standard_normal(5).astype("float32"), "bias")]
    m, result = check_pass(model(nodes, {"x": [3, 4], "w": [4, 5]}, {"y": [3, 5]}, inits), PASS, modified=False)
    assert counts(m)["MatMul"] == 1
    assert "not a constant 2-D float" in result.declined[0][1]
