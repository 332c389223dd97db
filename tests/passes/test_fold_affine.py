"""fold_affine: constant per-channel Mul/Add folded into the producer's weights and bias."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_models import check_pass, counts, init, model, randn, rng
from onnx import helper

PASS = "fold_affine"


def _chain(
    producer: list, inits: list, x_shape: list[int], y_shape: list[int], ops: list[tuple[str, list[int]]], seed: int = 0
):
    """``producer`` nodes write ``p``; then each (op, constant shape) in ``ops`` in a chain."""
    r = rng(seed)
    nodes = list(producer)
    src = "p"
    for i, (op, shape) in enumerate(ops):
        value = np.abs(r.standard_normal(shape)) + 0.5 if op == "Mul" else r.standard_normal(shape)
        inits.append(init(f"k{i}", value))
        out = "y" if i == len(ops) - 1 else f"t{i}"
        operands = [src, f"k{i}"] if i % 2 == 0 else [f"k{i}", src]  # constant on either side
        nodes.append(helper.make_node(op, operands, [out], name=f"{op.lower()}{i}"))
        src = out
    return model(nodes, {"x": x_shape}, {"y": y_shape}, inits)


def _conv(bias: bool, r=None):
    r = r or rng(1)
    inits = [randn(r, "W", [6, 4, 3, 3])] + ([randn(r, "b", [6])] if bias else [])
    node = helper.make_node("Conv", ["x", "W", *(["b"] if bias else [])], ["p"], name="conv", pads=[1, 1, 1, 1])
    return [node], inits


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "ops",
    [
        [("Mul", [6, 1, 1]), ("Add", [1, 6, 1, 1])],
        [("Add", [6, 1, 1]), ("Mul", [6, 1, 1]), ("Add", [])],
        [("Mul", [])],
        [("Add", [1])],
    ],
    ids=["mul_add", "add_mul_add", "scalar_mul", "scalar_add"],
)
def test_conv_chain_folds(ops: list, bias: bool) -> None:
    nodes, inits = _conv(bias)
    m, result = check_pass(_chain(nodes, inits, [2, 4, 5, 5], [2, 6, 5, 5], ops), PASS)
    assert counts(m) == {"Conv": 1}
    assert result.stats["mul"] + result.stats["add"] == len(ops)
    assert m.graph.node[0].output[0] == "y"


def test_grouped_conv_transpose_mul_folds() -> None:
    r = rng(2)
    inits = [randn(r, "W", [4, 3, 3, 3]), randn(r, "b", [6])]
    node = helper.make_node("ConvTranspose", ["x", "W", "b"], ["p"], group=2, strides=[2, 2])
    m, _ = check_pass(
        _chain([node], inits, [2, 4, 3, 3], [2, 6, 7, 7], [("Mul", [1, 6, 1, 1]), ("Add", [6, 1, 1])]), PASS
    )
    assert counts(m) == {"ConvTranspose": 1}


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_mul_add_folds(trans_b: int) -> None:
    r = rng(3)
    inits = [randn(r, "B", [5, 4] if trans_b else [4, 5]), randn(r, "C", [1, 5])]
    node = helper.make_node("Gemm", ["x", "B", "C"], ["p"], transB=trans_b, alpha=0.5, beta=2.0)
    m, _ = check_pass(_chain([node], inits, [3, 4], [3, 5], [("Mul", [5]), ("Add", [1, 5])]), PASS)
    assert counts(m) == {"Gemm": 1}


@pytest.mark.parametrize(
    ("x_shape", "with_bias"), [([3, 4], False), ([3, 4], True), ([2, 3, 4], False)], ids=["2d", "2d_bias", "3d"]
)
def test_matmul_mul_folds(x_shape: list[int], with_bias: bool) -> None:
    r = rng(4)
    inits = [randn(r, "W", [4, 5])]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm" if with_bias else "p"], name="matmul")]
    if with_bias:
        inits.append(randn(r, "bias", [5]))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["p"], name="bias_add"))
    ops = [("Mul", [1, 5])] + ([("Add", [5])] if with_bias else [])
    m, _ = check_pass(_chain(nodes, inits, x_shape, [*x_shape[:-1], 5], ops), PASS)
    assert counts(m) == ({"MatMul": 1, "Add": 1} if with_bias else {"MatMul": 1})


def test_add_after_bare_matmul_is_its_bias() -> None:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["p"])]
    _, result = check_pass(
        _chain(nodes, [randn(rng(5), "W", [4, 5])], [3, 4], [3, 5], [("Add", [5])]), PASS, modified=False
    )
    assert not result.declined


@pytest.mark.parametrize(
    ("producer", "x_shape", "y_shape", "ops", "reason"),
    [
        ("conv", [2, 4, 5, 5], [2, 6, 5, 5], [("Mul", [1, 1, 5, 5])], "not per output channel"),
        ("conv", [2, 4, 5, 5], [2, 6, 5, 5], [("Add", [6, 1, 1, 1, 1])], "would broadcast"),
        ("conv1d", [1, 4, 7], [6, 6, 7], [("Mul", [6, 1, 1])], "not per output channel"),
        ("gemm", [3, 4], [3, 5], [("Add", [3, 5])], "not per output channel"),
    ],
    ids=["spatial_mul", "higher_rank_add", "conv1d_rank3_const", "gemm_full_add"],
)
def test_non_per_channel_declines(producer: str, x_shape, y_shape, ops, reason: str) -> None:
    r = rng(6)
    if producer == "conv":
        nodes, inits = _conv(True, r)
    elif producer == "conv1d":
        inits = [randn(r, "W", [6, 4, 3])]
        nodes = [helper.make_node("Conv", ["x", "W"], ["p"], pads=[1, 1])]
    else:
        inits = [randn(r, "B", [4, 5])]
        nodes = [helper.make_node("Gemm", ["x", "B"], ["p"])]
    if producer == "conv" and ops[0][1] == [6, 1, 1, 1, 1]:
        y_shape = [6, 2, 6, 5, 5]
    m, result = check_pass(_chain(nodes, inits, x_shape, y_shape, ops), PASS, modified=False)
    assert counts(m)[ops[0][0]] == 1
    assert reason in result.declined[0][1], result.declined


def test_producer_output_also_used_declines() -> None:
    nodes, inits = _conv(True)
    src = _chain(nodes, inits, [2, 4, 5, 5], [2, 6, 5, 5], [("Mul", [6, 1, 1])])
    src.graph.node.append(helper.make_node("Relu", ["p"], ["r"], name="relu"))
    src.graph.output.append(helper.make_tensor_value_info("r", 1, [2, 6, 5, 5]))
    m, result = check_pass(src, PASS, modified=False)
    assert counts(m)["Mul"] == 1
    assert "also feeds relu" in result.declined[0][1]


def test_chain_stops_at_non_per_channel() -> None:
    nodes, inits = _conv(False)
    src = _chain(nodes, inits, [2, 4, 5, 5], [2, 6, 5, 5], [("Mul", [6, 1, 1]), ("Add", [1, 1, 5, 5]), ("Mul", [])])
    m, result = check_pass(src, PASS)
    assert counts(m) == {"Conv": 1, "Add": 1, "Mul": 1}
    assert result.stats == {"mul": 1, "add": 0}
    assert [name for name, _ in result.declined] == ["add1"]
