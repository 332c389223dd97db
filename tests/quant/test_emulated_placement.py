"""Where emulated FP8 / HiF8 / MX activations are written: once per tensor, only at quantized inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.api import quantize
from onnxcomp.formats import get_format
from onnxcomp.testing import run_model

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO = MODELS / "digits_cnn.onnx"
CALIB = [{"input": np.load(MODELS / "digits_calib.npz")["input"][:64]}]
DEMO_INPUTS = {"input", "relu1_out", "pool2_out", "pool3_out", "flatten_out", "relu_fc1_out"}  # 4 Conv + 2 Gemm


def _emulated_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors an activation subgraph starts from: the dividend of each ``*_scaled`` Div."""
    return {n.input[0] for n in model.graph.node if n.op_type == "Div" and n.name.rsplit("_", 1)[0].endswith("scaled")}


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "hif8"])
def test_static_float_activations_only_at_quantized_inputs(fmt: str) -> None:
    """No output emulation after a Conv (it serves only ORT's integer kernels): one subgraph per input tensor."""
    report = quantize(DEMO, weights=fmt, activations=fmt, calibration=CALIB, reports=False)
    assert _emulated_tensors(report.model) == DEMO_INPUTS
    record = report.result("quantize").data["record"]
    assert all(not e.get("outputs") for e in record), [e["node"] for e in record if e.get("outputs")]
    x = np.load(MODELS / "digits_heldout.npz")["input"]
    ref = run_model(onnx.load(DEMO), {"input": x})[0].argmax(1)
    agree = float((run_model(report.model, {"input": x})[0].argmax(1) == ref).mean())
    assert agree >= 0.99, agree


def test_integer_activations_keep_their_output_q() -> None:
    """uint8 keeps the Conv output Q/DQ that QLinearConv needs."""
    record = quantize(DEMO, calibration=CALIB, reports=False).result("quantize").data["record"]
    assert any(e.get("outputs") for e in record)


def _three_readers() -> onnx.ModelProto:
    """x (M, 64) read by three MatMuls (the Q, K, V projections of an attention block)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(3)]
    graph = helper.make_graph(
        nodes,
        "qkv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 64])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", 16]) for i in range(3)],
        [numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), f"w{i}") for i in range(3)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("fmt", ["hif8", "mxfp8"])
def test_dynamic_emulation_is_shared_by_every_reader(fmt: str) -> None:
    model = quantize(_three_readers(), weights=fmt, activations=fmt, dynamic=fmt == "hif8", fuse=False).model
    marker = "Log"  # one exponent estimate per subgraph (HiF8 binade, MX block scale)
    assert sum(n.op_type == marker for n in model.graph.node) == 1
    readers = {n.input[0] for n in model.graph.node if n.op_type == "MatMul"}
    assert len(readers) == 1 and "x" not in readers  # all three read the one emulated tensor
    x = (np.random.default_rng(1).standard_normal((5, 64)) * 3).astype(np.float32)
    got = run_model(model, {"x": x}, level="disable")
    weights = {t.name: numpy_helper.to_array(t) for t in _three_readers().graph.initializer}
    if fmt == "mxfp8":  # the codec on 2 blocks of 32 along K, then the exact weights
        xq = get_format("mxfp8").quantize_dequantize(x, axis=1)
        for i in range(3):
            wq = get_format("mxfp8").quantize_dequantize(weights[f"w{i}"], axis=0)
            np.testing.assert_allclose(got[i], xq @ wq, rtol=1e-5, atol=1e-5)
