"""fold_batchnorm: BN folded into Conv/ConvTranspose/Gemm/MatMul(+Add), and every decline."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_models import (
    bn_node,
    bn_params,
    check_pass,
    counts,
    init,
    initializer,
    model,
    randn,
    rng,
    run,
)
from onnx import helper

PASS = "fold_batchnorm"


def _assert_folded(m, result, expected_counts: dict[str, int]) -> None:
    assert counts(m) == expected_counts
    assert result.stats["folded"] == 1
    assert not result.declined


def _assert_declined(m, result, reason: str) -> None:
    assert counts(m).get("BatchNormalization") == 1
    assert len(result.declined) == 1
    assert reason in result.declined[0][1], result.declined


# --- Conv --------------------------------------------------------------------------------------

CONV_CASES = {
    "conv2d": (2, 4, 6, 1),
    "conv2d_group2": (2, 4, 6, 2),
    "depthwise": (2, 4, 4, 4),
    "depthwise_x2": (2, 4, 8, 4),
    "conv1d": (1, 4, 6, 1),
    "conv3d_group2": (3, 4, 6, 2),
}
SPATIAL = {1: [9], 2: [6, 7], 3: [4, 5, 3]}


def _conv_bn(op: str, dims: int, cin: int, cout: int, group: int, bias: bool, stride: int = 1):
    r = rng(dims * 100 + cin * 10 + group)
    kernel = [3] * dims
    wshape = [cout, cin // group, *kernel] if op == "Conv" else [cin, cout // group, *kernel]
    inits = [randn(r, "W", wshape), *bn_params(r, "bn", cout)]
    inputs = ["x", "W"]
    if bias:
        inits.append(randn(r, "b", [cout]))
        inputs.append("b")
    attrs = {"group": group, "pads": [1] * (2 * dims), "strides": [stride] * dims}
    nodes = [helper.make_node(op, inputs, ["c"], name="conv", **attrs), bn_node("c", "y", "bn")]
    return model(nodes, {"x": [2, cin, *SPATIAL[dims]]}, {"y": [2, cout, *(["d"] * dims)]}, inits)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("dims", "cin", "cout", "group"), list(CONV_CASES.values()), ids=list(CONV_CASES))
def test_conv_bn_folds(dims: int, cin: int, cout: int, group: int, bias: bool) -> None:
    m, result = check_pass(_conv_bn("Conv", dims, cin, cout, group, bias), PASS)
    _assert_folded(m, result, {"Conv": 1})
    assert len(m.graph.node[0].input) == 3  # a bias was created when absent
    assert m.graph.output[0].name == "y"


CONVT_CASES = {"group1": (4, 6, 1, 1), "group2_stride2": (4, 6, 2, 2), "group4_x2": (4, 8, 4, 1)}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("cin", "cout", "group", "stride"), list(CONVT_CASES.values()), ids=list(CONVT_CASES))
def test_conv_transpose_bn_folds(cin: int, cout: int, group: int, stride: int, bias: bool) -> None:
    m, result = check_pass(_conv_bn("ConvTranspose", 2, cin, cout, group, bias, stride), PASS)
    _assert_folded(m, result, {"ConvTranspose": 1})


def test_float16_conv_keeps_dtype() -> None:
    r = rng(7)
    inits = [randn(r, "W", [6, 4, 3, 3], np.float16), *bn_params(r, "bn", 6, np.float16)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y", "bn")]
    src = model(nodes, {"x": [2, 4, 5, 5]}, {"y": [2, 6, 5, 5]}, inits, dtype=np.float16)
    m, _ = check_pass(src, PASS, rtol=2e-2, atol=2e-2)
    assert initializer(m, "W").dtype == np.float16
    assert counts(m) == {"Conv": 1}


def test_shared_weight_gets_a_new_constant() -> None:
    r = rng(3)
    inits = [randn(r, "W", [6, 4, 3, 3]), *bn_params(r, "bn", 6)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv_a", pads=[1, 1, 1, 1]),
        bn_node("c", "ya", "bn"),
        helper.make_node("Conv", ["x", "W"], ["yb"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    src = model(nodes, {"x": [2, 4, 5, 5]}, {"ya": [2, 6, 5, 5], "yb": [2, 6, 5, 5]}, inits)
    m, result = check_pass(src, PASS)  # both outputs compared: conv_b is unchanged
    assert result.stats["folded"] == 1
    conv_a, conv_b = (n for n in m.graph.node if n.op_type == "Conv")
    assert conv_b.input[1] == "W" and conv_a.input[1] != "W"
    np.testing.assert_array_equal(initializer(m, "W"), initializer(src, "W"))


# --- Gemm --------------------------------------------------------------------------------------

C_SHAPES = {"noC": None, "scalarC": [], "C_N": [5], "C_1N": [1, 5]}


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.0)], ids=["a1b1", "a05b2"])
@pytest.mark.parametrize("c_shape", list(C_SHAPES.values()), ids=list(C_SHAPES))
@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB0", "transB1"])
def test_gemm_bn_folds(trans_b: int, c_shape: list[int] | None, alpha: float, beta: float) -> None:
    r = rng(11 + trans_b)
    inits = [randn(r, "B", [5, 4] if trans_b else [4, 5]), *bn_params(r, "bn", 5)]
    inputs = ["a", "B"]
    if c_shape is not None:
        inits.append(randn(r, "C", c_shape))
        inputs.append("C")
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=alpha, beta=beta),
        bn_node("g", "y", "bn"),
    ]
    m, result = check_pass(model(nodes, {"a": [3, 4]}, {"y": [3, 5]}, inits), PASS)
    _assert_folded(m, result, {"Gemm": 1})


def test_gemm_with_full_bias_declines() -> None:
    r = rng(12)
    inits = [randn(r, "B", [4, 5]), randn(r, "C", [3, 5]), *bn_params(r, "bn", 5)]
    nodes = [helper.make_node("Gemm", ["a", "B", "C"], ["g"], name="gemm"), bn_node("g", "y", "bn")]
    m, result = check_pass(model(nodes, {"a": [3, 4]}, {"y": [3, 5]}, inits), PASS, modified=False)
    _assert_declined(m, result, "bias C")


# --- MatMul ------------------------------------------------------------------------------------


def _matmul_bn(x_shape: list[int] | None, bias_shape: list[int] | None, relu: bool = False, channels: int = 5):
    r = rng(21)
    inits = [randn(r, "W", [4, 5]), *bn_params(r, "bn", channels)]
    nodes = [helper.make_node("Relu", ["x"], ["xr"])] if relu else []
    nodes.append(helper.make_node("MatMul", ["xr" if relu else "x", "W"], ["mm"], name="matmul"))
    src = "mm"
    if bias_shape is not None:
        inits.append(randn(r, "bias", bias_shape))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["mma"], name="bias_add"))
        src = "mma"
    nodes.append(bn_node(src, "y", "bn"))
    out_shape = [3, 5] if x_shape is None else [*x_shape[:-1], 5]
    return model(nodes, {"x": x_shape}, {"y": out_shape}, inits)


@pytest.mark.parametrize("bias_shape", [None, [5], [1, 5]], ids=["bare", "bias_N", "bias_1N"])
def test_matmul_bn_folds(bias_shape: list[int] | None) -> None:
    m, result = check_pass(_matmul_bn([3, 4], bias_shape), PASS)
    _assert_folded(m, result, {"MatMul": 1, "Add": 1})  # a bare MatMul gets a bias Add


def test_matmul_rank_from_shape_inference() -> None:
    src = _matmul_bn([3, 4], None, relu=True)  # the Relu output has no value_info
    m, result = check_pass(src, PASS)
    _assert_folded(m, result, {"Relu": 1, "MatMul": 1, "Add": 1})
    _, result = check_pass(src, PASS, modified=False, infer_shapes=False)
    assert "unknown" in result.declined[0][1]


def test_matmul_3d_declines() -> None:
    # BN normalizes axis 1 (T=5 here), not the MatMul's channel axis.
    m, result = check_pass(_matmul_bn([2, 5, 4], [5], channels=5), PASS, modified=False)
    _assert_declined(m, result, "3-D")


# --- declines ----------------------------------------------------------------------------------


def _conv_bn_graph(extra_nodes=(), outputs=None, inputs=None, bn_attrs=None, bn_outputs=("y",)):
    r = rng(5)
    inits = [randn(r, "W", [6, 4, 3, 3]), *bn_params(r, "bn", 6)]
    names = [f"bn_{p}" for p in ("scale", "B", "mean", "var")]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", *names], list(bn_outputs), name="bn", **(bn_attrs or {})),
        *extra_nodes,
    ]
    graph_inputs = {"x": [2, 4, 5, 5], **(inputs or {})}
    inits = [t for t in inits if t.name not in graph_inputs]
    return model(nodes, graph_inputs, outputs or {"y": [2, 6, 5, 5]}, inits)


DECLINES = {
    "also_feeds_relu": (
        {
            "extra_nodes": [helper.make_node("Relu", ["c"], ["r"], name="relu")],
            "outputs": {"y": [2, 6, 5, 5], "r": [2, 6, 5, 5]},
        },
        "also feeds relu",
    ),
    "graph_output": ({"outputs": {"y": [2, 6, 5, 5], "c": [2, 6, 5, 5]}}, "is a graph output"),
    "scale_is_input": ({"inputs": {"bn_scale": [6]}}, "scale input 'bn_scale' is not a constant"),
    "weight_is_input": ({"inputs": {"W": [6, 4, 3, 3]}}, "weight of Conv 'conv' is not a constant"),
    "training_mode": ({"bn_attrs": {"training_mode": 1}, "bn_outputs": ("y", "rm", "rv")}, "training_mode=1"),
}


@pytest.mark.parametrize(("kwargs", "reason"), list(DECLINES.values()), ids=list(DECLINES))
def test_declines(kwargs: dict, reason: str) -> None:
    m, result = check_pass(_conv_bn_graph(**kwargs), PASS, modified=False)
    _assert_declined(m, result, reason)


def test_bn_after_relu_declines_with_producer() -> None:
    r = rng(6)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y", "bn")]
    src = model(nodes, {"x": [2, 4, 3, 3]}, {"y": [2, 4, 3, 3]}, bn_params(r, "bn", 4))
    m, result = check_pass(src, PASS, modified=False)
    _assert_declined(m, result, "produced by Relu")


def test_non_finite_fold_declines() -> None:
    r = rng(8)
    params = bn_params(r, "bn", 6)
    params[0] = init("bn_scale", np.full(6, 3e38))  # scale / sqrt(var + eps) overflows float32
    inits = [init("W", np.full((6, 4, 3, 3), 10.0)), *params]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y", "bn")]
    src = model(nodes, {"x": [2, 4, 5, 5]}, {"y": [2, 6, 5, 5]}, inits)
    report = run(src, PASS)
    result = report.result(PASS)
    assert not result.modified
    _assert_declined(report.model, result, "non-finite")


def test_weight_from_constant_node_and_shared_bias() -> None:
    r = rng(9)
    w = np.asarray(r.standard_normal((6, 4, 3, 3)), np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=init("Wc", w)),
        helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv_a", pads=[1, 1, 1, 1]),
        bn_node("c", "ya", "bn"),
        helper.make_node("Conv", ["x", "W2", "b"], ["yb"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    inits = [randn(r, "W2", [6, 4, 3, 3]), randn(r, "b", [6]), *bn_params(r, "bn", 6)]
    src = model(nodes, {"x": [2, 4, 5, 5]}, {"ya": [2, 6, 5, 5], "yb": [2, 6, 5, 5]}, inits)
    m, result = check_pass(src, PASS)
    assert counts(m) == {"Conv": 2}
    assert result.stats["folded"] == 1
    np.testing.assert_array_equal(initializer(m, "b"), initializer(src, "b"))
