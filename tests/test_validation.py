"""Validation that means it: the manager runs a rewritten model once at ORT_ENABLE_ALL on a sample
and compares it with the input model, naming the pass (and node) that broke it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import ir
from onnxcomp.errors import PassError
from onnxcomp.framework import PassContext, PassManager
from onnxcomp.framework.base import Pass, PassResult
from onnxcomp.framework.validation import MIN_COSINE, generated_feeds, inference_sample
from onnxcomp.runtime import ort_session

RNG = np.random.default_rng(0)


def _matmul_model(weight: np.ndarray, x_shape: list) -> onnx.ModelProto:
    out_shape = [*x_shape[:-1], weight.shape[-1]]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _weight_node(graph: ir.Graph) -> ir.Node:
    return next(n for n in graph.nodes if n.op == "MatMul")


class PerChannelBatchedQDQ(Pass):
    """Writes what quantize used to write for a batched MatMul weight: loads, fails on first run."""

    name = "per_channel_batched_qdq"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        node = _weight_node(graph)
        w = ir.constant_value(node.inputs[1])
        assert w is not None
        scale = (np.abs(w).reshape(-1, w.shape[-1]).max(0) / 127).astype(np.float32)
        codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        deq = ir.make_variable(graph, "w_dq", dtype=np.float32)
        consts = [
            ir.make_constant("w_q", codes),
            ir.make_constant("w_scale", scale),
            ir.make_constant("w_zp", np.zeros_like(codes[0, 0])),
        ]
        ir.make_node(graph, "DequantizeLinear", consts, [deq], name="w_dequant", attrs={"axis": 2})
        x = node.inputs[0]
        xq = ir.make_variable(graph, "x_q", dtype=np.uint8)
        xd = ir.make_variable(graph, "x_dq", dtype=np.float32)
        s, z = ir.make_constant("x_scale", np.float32(0.05)), ir.make_constant("x_zp", np.uint8(128))
        ir.make_node(graph, "QuantizeLinear", [x, s, z], [xq], name="x_quant")
        ir.make_node(graph, "DequantizeLinear", [xq, s, z], [xd], name="x_dequant")
        node.inputs[0] = xd
        node.inputs[1] = deq
        return PassResult(modified=True)


class TransposeWeight(Pass):
    """A wrong rewrite that keeps the model valid: the square weight transposed."""

    name = "transpose_weight"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        node = _weight_node(graph)
        ir.write_input(graph, node, 1, np.ascontiguousarray(ir.constant_value(node.inputs[1]).T))
        return PassResult(modified=True)


class ScaleWeight(Pass):
    """A rewrite that changes values a little (like quantization noise): must pass."""

    name = "scale_weight"

    @dataclass(frozen=True)
    class Options:
        factor: float = 1.05

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        node = _weight_node(graph)
        value = ir.constant_value(node.inputs[1])
        ir.write_input(graph, node, 1, (value * self.options.factor).astype(np.float32))
        return PassResult(modified=True)


def _batched() -> onnx.ModelProto:
    return _matmul_model(RNG.standard_normal((4, 8, 6)).astype(np.float32), ["N", 4, 3, 8])


def _square() -> onnx.ModelProto:
    return _matmul_model(RNG.standard_normal((16, 16)).astype(np.float32), ["N", 16])


@pytest.mark.parametrize("mode", ["each", "locate"])
def test_a_model_that_fails_its_first_inference_names_the_pass_and_node(mode: str) -> None:
    passes = [ScaleWeight(), PerChannelBatchedQDQ()]
    with pytest.raises(PassError) as info:
        PassManager(passes, validate=mode).run(_batched())
    message = str(info.value)
    assert "pass 'per_channel_batched_qdq' (step 2 of 2) produced an invalid model" in message
    assert "first inference at ORT_ENABLE_ALL" in message and "'mm'" in message


def test_session_creation_alone_accepts_that_model() -> None:
    """What validation used to check: the broken model loads at ORT_ENABLE_ALL."""
    report = PassManager([PerChannelBatchedQDQ()], validate="none").run(_batched())
    assert ort_session(report.model, level="all") is not None


@pytest.mark.parametrize("mode", ["each", "locate"])
def test_a_numerically_broken_rewrite_is_named(mode: str) -> None:
    with pytest.raises(PassError) as info:
        PassManager([ScaleWeight(), TransposeWeight()], validate=mode).run(_square())
    message = str(info.value)
    assert "pass 'transpose_weight' (step 2 of 2) produced an invalid model" in message
    assert "output 'y' no longer matches" in message and f"< {MIN_COSINE}" in message


def test_non_finite_outputs_are_caught() -> None:
    with pytest.raises(PassError, match=r"scale_weight.*output 'y' has \d+ non-finite values"):
        PassManager([ScaleWeight(ScaleWeight.Options(factor=float("inf")))]).run(_square())


def test_noise_passes() -> None:
    report = PassManager([ScaleWeight()]).run(_square())
    assert report.steps[0].result.modified


def test_sample_is_the_first_calibration_batch() -> None:
    model = _square()
    batches = [{"x": np.full((3, 16), 0.5, np.float32)}, {"x": np.zeros((5, 16), np.float32)}]
    sample = inference_sample(model, iter(batches))
    assert not isinstance(sample, str)
    assert sample.source == "the first calibration batch"
    np.testing.assert_array_equal(sample.feeds["x"], batches[0]["x"])
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(sample.expected["y"], batches[0]["x"] @ w, rtol=1e-5)


def test_generated_sample_uses_declared_shapes() -> None:
    feeds = generated_feeds(_batched())
    assert not isinstance(feeds, str)
    assert feeds["x"].shape == (1, 4, 3, 8) and feeds["x"].dtype == np.float32
    sample = inference_sample(_batched())
    assert not isinstance(sample, str) and sample.source == "inputs generated from the declared shapes"


def test_no_sample_for_a_sequence_input_falls_back_to_loading() -> None:
    graph = helper.make_graph(
        [helper.make_node("SequenceAt", ["s", "i"], ["y"], name="at")],
        "seq",
        [
            helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    reason = inference_sample(model)
    assert isinstance(reason, str) and "'s' is not a tensor" in reason
    PassManager([]).run(model)  # validates by loading only, no error


class PruneLike(ScaleWeight):
    """A pass whose error the user chose (pruning, low rank): values are not compared, running is."""

    name = "prune_like"
    keeps_outputs_close = False

    def __init__(self) -> None:
        super().__init__(ScaleWeight.Options(factor=-1.0))  # cosine -1: caught if values were compared


def test_passes_that_remove_capacity_are_checked_for_running_not_for_closeness() -> None:
    with pytest.raises(PassError, match="no longer matches"):
        PassManager([ScaleWeight(ScaleWeight.Options(factor=-1.0))]).run(_square())
    report = PassManager([PruneLike()]).run(_square())
    assert report.steps[0].result.modified
    with pytest.raises(PassError, match=r"pass 'per_channel_batched_qdq' \(step 2 of 2\).*first inference"):
        PassManager([PruneLike(), PerChannelBatchedQDQ()]).run(_batched())
