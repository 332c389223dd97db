"""One definition of a constant weight: chains over initializers, Constant nodes, DQ'd weights,
constant-on-the-left MatMul, batched 3-D MatMul weights and Gemm biases of shape (1,), through
quantize (W8A8 and weight-only), sparsify 2:4, decompose and fuse; outputs checked in onnxruntime
at ORT_DISABLE_ALL and ORT_ENABLE_ALL.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import ir
from onnxcomp.api import decompose, fuse, quantize, sparsify
from onnxcomp.testing import op_counts, run_model

K, N = 32, 24  # the weight as MatMul sees it: (K, N)
RNG = np.random.default_rng(0)
W = RNG.standard_normal((K, N)).astype(np.float32) * 0.2
X = RNG.standard_normal((64, K)).astype(np.float32)
CALIB = [{"x": X[i : i + 16]} for i in range(0, 64, 16)]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], weight: str = "w") -> onnx.ModelProto:
    """x[B, K] -> MatMul(x, weight) -> Relu -> y[B, N], ``weight`` made by ``nodes`` from ``inits``."""
    graph = helper.make_graph(
        [*nodes, helper.make_node("MatMul", ["x", weight], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["y"])],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def _chain(kind: str) -> onnx.ModelProto:
    """The same weight ``W`` written the ways exporters write it."""
    if kind == "transpose":
        return _model([helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0])], [_const("wt", W.T.copy())])
    if kind == "reshape":
        shape = _const("shape", np.array([K, N], np.int64))
        return _model([helper.make_node("Reshape", ["wf", "shape"], ["w"])], [_const("wf", W.reshape(-1)), shape])
    if kind == "cast_bf16":
        bf16 = W.astype(ml_dtypes.bfloat16)
        return _model([helper.make_node("Cast", ["wb"], ["w"], to=TensorProto.FLOAT)], [_const("wb", bf16)])
    if kind == "mul":
        scale = np.linspace(0.5, 2.0, N).astype(np.float32)
        return _model(
            [helper.make_node("Mul", ["wu", "s"], ["w"])],
            [_const("wu", (W / scale).astype(np.float32)), _const("s", scale)],
        )
    if kind == "squeeze":
        axes = _const("axes", np.array([0], np.int64))
        return _model([helper.make_node("Squeeze", ["w3", "axes"], ["w"])], [_const("w3", W[None]), axes])
    if kind == "constant_node":
        return _model([helper.make_node("Constant", [], ["w"], value=_const("wc", W))], [])
    raise AssertionError(kind)


CHAINS = ("transpose", "reshape", "cast_bf16", "mul", "squeeze", "constant_node")
CHAIN_OPS = {"Transpose", "Reshape", "Cast", "Mul", "Squeeze", "Constant"}


def _relative_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """Worst max-abs error relative to the reference's range, over both ORT optimization levels."""
    want = run_model(reference, feeds, level="disable")[0]
    worst = 0.0
    for level in ("disable", "all"):
        got = run_model(candidate, feeds, level=level)[0]
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


# --- the definition ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CHAINS)
def test_float_weight_sees_through_every_chain(kind: str) -> None:
    graph = ir.import_model(_chain(kind))
    node = next(n for n in graph.nodes if n.op == "MatMul")
    value = ir.float_weight(node, 1, "weight")
    assert not isinstance(value, str), value
    want = W.astype(ml_dtypes.bfloat16).astype(np.float32) if kind == "cast_bf16" else W
    np.testing.assert_allclose(value, want, rtol=1e-6)
    assert value.dtype == np.float32


def test_dequantized_weight_is_already_quantized() -> None:
    codes = np.clip(np.round(W / 0.01), -127, 127).astype(np.int8)
    dq = helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="w_dq", axis=1)
    model = _model([dq], [_const("wq", codes), _const("ws", np.full(N, 0.01, np.float32))])
    node = next(n for n in ir.import_model(model).nodes if n.op == "MatMul")
    reason = ir.float_weight(node, 1, "weight")
    assert isinstance(reason, str) and "already quantized" in reason and "w_dq" in reason
    report = quantize(model, activations="none", reports=False)
    declined = dict(report.result("quantize").declined)
    assert "already quantized" in declined["mm"]


def test_non_float_and_activation_reasons() -> None:
    graph = ir.import_model(_left_model())
    node = next(n for n in graph.nodes if n.op == "MatMul")
    reason = ir.float_weight(node, 1, "weight")
    assert isinstance(reason, str) and "first input (A)" in reason


def test_fold_growth_counts_only_exclusive_sources() -> None:
    graph = ir.import_model(_chain("cast_bf16"))
    node = next(n for n in graph.nodes if n.op == "MatMul")
    assert ir.fold_growth(node.inputs[1]) == W.nbytes - W.nbytes // 2  # fp32 copy minus the bf16 source
    graph = ir.import_model(_chain("transpose"))
    node = next(n for n in graph.nodes if n.op == "MatMul")
    assert ir.fold_growth(node.inputs[1]) == 0


# --- quantize ------------------------------------------------------------------------------


@pytest.mark.parametrize("fuse_first", [True, False], ids=["fused", "no-fuse"])
@pytest.mark.parametrize("kind", CHAINS)
def test_w8a8_quantizes_weights_behind_chains(kind: str, fuse_first: bool) -> None:
    src = _chain(kind)
    out = quantize(src, calibration=CALIB, fuse=fuse_first, reports=False).model
    counts = op_counts(out)
    assert not CHAIN_OPS & set(counts), counts  # the chain was folded, then quantized
    assert counts.get("DequantizeLinear", 0) >= 2  # weight and activation
    assert _relative_error(src, out, {"x": X[:8]}) < 0.05


@pytest.mark.parametrize("kind", CHAINS)
def test_weight_only_quantizes_weights_behind_chains(kind: str) -> None:
    src = _chain(kind)
    out = quantize(src, activations="none", fuse=False, reports=False).model
    counts = op_counts(out)
    assert not CHAIN_OPS & set(counts) and counts.get("MatMulNBits") == 1, counts
    assert _relative_error(src, out, {"x": X[:8]}) < 0.02


# --- constant on the left ------------------------------------------------------------------


def _left_model() -> onnx.ModelProto:
    """x[B, K, T] -> MatMul(A, x) with constant A (M, K) -> y[B, M, T] (token mixing, conv-as-matmul)."""
    a = RNG.standard_normal((N, K)).astype(np.float32) * 0.2
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "x"], ["y"], name="mm_left")],
        "left",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N, 5])],
        [_const("a", a)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


LEFT_X = RNG.standard_normal((16, K, 5)).astype(np.float32)


@pytest.mark.parametrize(
    ("options", "tol"),
    [
        ({"calibration": [{"x": LEFT_X}]}, 0.05),
        ({"activations": "none"}, 0.02),
        ({"activations": "none", "weights": "int4", "granularity": "group:32"}, 0.2),
        ({"dynamic": True, "dynamic_granularity": "tensor"}, 0.05),
    ],
    ids=["w8a8", "w8", "w4-matmulnbits", "dynamic"],
)
def test_constant_on_the_left_is_quantized_along_its_own_reduction_axis(options: dict, tol: float) -> None:
    src = _left_model()
    report = quantize(src, reports=False, **options)
    assert "mm_left" in [e["node"] for e in report.result("quantize").data["record"]]
    assert _relative_error(src, report.model, {"x": LEFT_X[:4]}) < tol


def test_constant_on_the_left_with_unknown_rank_is_declined() -> None:
    a = RNG.standard_normal((N, K)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["xr"], name="reshape"),  # rank set by a runtime input
            helper.make_node("MatMul", ["a", "xr"], ["y"], name="mm_left"),
        ],
        "left_unknown_rank",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K, 5]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, ["R"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N, 5])],
        [_const("a", a)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = quantize(model, activations="none", reports=False)
    declined = dict(report.result("quantize").declined)
    assert "input A" in declined["mm_left"] and "rank unknown" in declined["mm_left"]


# --- the two defects -----------------------------------------------------------------------


def test_w8a8_batched_3d_matmul_weight_runs_at_enable_all() -> None:
    w = RNG.standard_normal((4, 8, 6)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["y"])],
        "batched",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3, 6])],
        [_const("w", w)],
    )
    src = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src.ir_version = 8
    x = RNG.standard_normal((8, 4, 3, 8)).astype(np.float32)
    report = quantize(src, calibration=[{"x": x}], reports=False)
    (entry,) = report.result("quantize").data["record"]
    assert entry["weights"]["granularity"] == "tensor"  # what MatMulIntegerToFloat accepts for a batched B
    assert _relative_error(src, report.model, {"x": x[:2]}) < 0.05


@pytest.mark.parametrize("bias_shape", [(1,), (), (1, N)])
def test_w8a8_gemm_with_broadcast_bias(bias_shape: tuple[int, ...]) -> None:
    bias = np.full(bias_shape, 0.3, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm")],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])],
        [_const("w", W), _const("b", bias)],
    )
    src = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src.ir_version = 8
    out = quantize(src, calibration=CALIB, reports=False).model
    bias_init = [t for t in out.graph.initializer if t.data_type == TensorProto.INT32]
    assert bias_init and all(list(t.dims) == [N] for t in bias_init)  # int32 bias (and zero point) per channel
    assert _relative_error(src, out, {"x": X[:8]}) < 0.05


def test_matmul_add_of_a_1_element_constant_fuses_and_quantizes() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["y"])],
        "mm_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])],
        [_const("w", W), _const("b", np.array([0.25], np.float32))],
    )
    src = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src.ir_version = 8
    out = quantize(src, calibration=CALIB, reports=False).model
    assert _relative_error(src, out, {"x": X[:8]}) < 0.05


# --- sparsify, decompose, fuse -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["transpose", "mul", "cast_bf16"])
def test_sparsify_2to4_sees_the_folded_weight(kind: str) -> None:
    src = _chain(kind)
    report = sparsify(src, pattern="2:4", method="magnitude")
    out = report.model
    (node,) = [n for n in out.graph.node if n.op_type == "MatMul"]
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    w = weights[node.input[1]]
    assert w.shape == (K, N)
    groups = (w.reshape(K // 4, 4, N) != 0).sum(axis=1)
    assert (groups <= 2).all()  # 2:4 along the reduction axis
    x = X[:8]
    for level in ("disable", "all"):
        got = run_model(out, {"x": x}, level=level)[0]
        np.testing.assert_allclose(got, np.maximum(x @ w, 0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["transpose", "reshape", "constant_node"])
def test_decompose_matmul_factors_the_folded_weight(kind: str) -> None:
    low_rank = (RNG.standard_normal((K, 4)) @ RNG.standard_normal((4, N))).astype(np.float32) * 0.1
    global W
    saved, W = W, low_rank
    try:
        src = _chain(kind)
    finally:
        W = saved
    report = decompose(src, layers="matmul", rank_rule="rank:4", options={"min_channels": 1, "align": 1})
    assert op_counts(report.model).get("MatMul") == 2
    assert _relative_error(src, report.model, {"x": X[:8]}) < 1e-4


@pytest.mark.parametrize("kind", ["transpose", "reshape", "mul", "squeeze", "constant_node"])
def test_fuse_folds_chains_without_growing(kind: str) -> None:
    src = _chain(kind)
    report = fuse(src)
    out = report.model
    assert report.result("fold_weight_constants").stats["folded"] == 1
    assert not CHAIN_OPS & set(op_counts(out))
    assert out.graph.ByteSize() <= src.graph.ByteSize()  # the weights take no more room than before
    assert _relative_error(src, out, {"x": X[:8]}) < 1e-6


def test_fuse_keeps_a_chain_that_would_grow_the_file() -> None:
    src = _chain("cast_bf16")
    report = fuse(src)
    result = report.result("fold_weight_constants")
    assert not result.modified and "would add" in result.declined[0][1]
    assert "Cast" in op_counts(report.model)
