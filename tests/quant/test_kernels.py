"""The fused-kernel report: which kernel onnxruntime runs for each quantized node (the deploy oracle).

Default W8A8 must run every quantized node of the demo and of the real models as an integer
kernel in onnxruntime's optimized graph (docs/onnxruntime.md#fused-patterns).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from onnx import TensorProto, helper, numpy_helper
from real_models import make_inputs, real_model

from onnxcomp import quantize
from onnxcomp.analysis.kernels import format_kernel_report, kernel_report
from onnxcomp.cli.main import main

DEMO = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"


def _left_in_float(kernels: dict) -> list[str]:
    return [f"{r['node']} ({r['op']} -> {r['kernel']}): {r['reason']}" for r in kernels["nodes"] if not r["integer"]]


def test_default_w8a8_runs_every_quantized_node_as_an_integer_kernel_on_the_demo(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(DEMO), "-o", str(out), "--calib", str(CALIB), "--calib-samples", "64"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime kernels (CPU, ORT_ENABLE_ALL): 6 integer, 0 float (QGemm 2, QLinearConv 4)" in printed
    report = json.loads(out.with_name("q.quant_report.json").read_text())
    assert report["kernels"]["integer"] == 6 and not _left_in_float(report["kernels"])
    record = json.loads(out.with_name("q.quant_record.json").read_text())
    assert {e["activations"][0]["dtype"] for e in record} == {"uint8"}  # the default that fuses on x86


@pytest.mark.parametrize("name", ["ppocr_cls", "ppocr_rec", "minilm_l3"])
def test_default_w8a8_runs_every_quantized_node_as_an_integer_kernel(name: str) -> None:
    """MobileNetV3 (hard-swish, SE, residuals), a CNN+transformer recognizer, a BERT encoder."""
    path = real_model(name)
    feeds = make_inputs(name, 4, 0)
    feeds = feeds[0] if isinstance(feeds, tuple) else feeds
    report = quantize(path, calibration=[feeds])
    kernels = report.result("quantize").data["kernels"]
    quantized = len(report.result("quantize").changed)
    assert kernels["integer"] == quantized > 0 and not _left_in_float(kernels), _left_in_float(kernels)


def test_int8_activation_fan_out_is_reported() -> None:
    """int8 activations read by two nodes: onnxruntime leaves producer and readers in float, and says so."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32), f"w{i}") for i in range(3)
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="c0"),
        helper.make_node("Conv", ["a", "w1"], ["b"], name="c1"),
        helper.make_node("Conv", ["a", "w2"], ["c"], name="c2"),
        helper.make_node("Add", ["b", "c"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "fanout",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"x": rng.standard_normal((4, 8, 4, 4)).astype(np.float32)}]
    s8 = quantize(model, calibration=calib, activations="int8", fuse=False, placement="all")
    s8 = s8.result("quantize").data["kernels"]
    left = {r["node"]: r["reason"] for r in s8["nodes"] if not r["integer"]}
    assert set(left) == {"c0", "c1", "c2"}, s8
    assert all("int8 activation 'a' has several readers" in r for r in left.values())
    text = format_kernel_report(s8)
    assert text.startswith("onnxruntime kernels (CPU, ORT_ENABLE_ALL): 0 integer, 3 float") and "use uint8" in text
    u8 = quantize(model, calibration=calib, fuse=False, placement="all").result("quantize").data["kernels"]
    assert u8["integer"] == 3 and u8["counts"] == {"QLinearConv": 3}


def test_conv_transpose_is_opt_in_and_reported_as_float() -> None:
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array((rng.standard_normal((8, 4, 2, 2)) * 0.3).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])],
        "up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"x": rng.standard_normal((2, 8, 4, 4)).astype(np.float32)}]
    default = quantize(model, calibration=calib, fuse=False)
    assert not default.result("quantize").modified  # not in the default ops
    opted = quantize(model, calibration=calib, fuse=False, config={"ops": ["ConvTranspose"]})
    kernels = opted.result("quantize").data["kernels"]
    assert kernels["float"] == 1 and "no integer ConvTranspose kernel" in kernels["nodes"][0]["reason"]


def test_kernel_report_on_a_model_it_did_not_write() -> None:
    """The report is a plain function of a model and node names (usable on any QDQ model)."""
    model = onnx.load(DEMO)
    kernels = kernel_report(model, [(n.name, n.op_type, None) for n in model.graph.node if n.op_type == "Conv"])
    assert kernels["integer"] == 0 and kernels["float"] == 4
    assert all(r["kernel"] in ("Conv", "FusedConv") for r in kernels["nodes"])


def test_dynamic_per_tensor_runs_as_fused_integer_kernels(tmp_path: Path) -> None:
    """--dynamic-granularity tensor: DynamicQuantizeLinear + MatMulInteger/ConvInteger, which ORT fuses."""
    held = np.load(MODELS / "digits_heldout.npz")
    out, sim = tmp_path / "d.onnx", tmp_path / "d.sim.onnx"
    report = quantize(DEMO, out, dynamic=True, dynamic_granularity="tensor", simulation_output=sim, placement="all")
    kernels = report.result("quantize").data["kernels"]
    assert kernels["integer"] == 6 and kernels["counts"] == {"ConvInteger": 4, "DynamicQuantizeMatMul": 2}
    fast = quantize(DEMO, dynamic=True, dynamic_granularity="tensor").result("quantize")  # placement speed
    assert fast.data["kernels"]["counts"] == {"DynamicQuantizeMatMul": 2}
    assert all("ConvInteger" in why for _, why in fast.declined) and len(fast.declined) == 4
    record = {e["node"]: e for e in report.result("quantize").data["record"]}
    assert record["conv1"]["activations"]["granularity"] == "dynamic"
    from onnxcomp.analysis.metrics import accuracy, predict

    x = {"input": held["input"]}
    exact = predict(onnx.load(out), x, level="disable")  # the unfused integer ops
    simulated = predict(onnx.load(sim), x, level="disable")
    # float vs integer accumulation can move a value across a rounding tie of the next layer's requantization
    assert (exact.argmax(1) == simulated.argmax(1)).mean() > 0.998
    np.testing.assert_allclose(exact, simulated, atol=0.01 * np.abs(simulated).max())
    fused = predict(onnx.load(out), x, level="all")  # ORT's fused kernels round a few values differently
    assert (fused.argmax(1) == exact.argmax(1)).mean() > 0.995
    np.testing.assert_allclose(fused, exact, atol=0.02 * np.abs(exact).max())
    assert accuracy(fused, held["label"]) >= 99.0


def test_dynamic_per_tensor_on_a_transformer() -> None:
    name = "minilm_l3"
    feeds = make_inputs(name, 4, 0)
    feeds = feeds[0] if isinstance(feeds, tuple) else feeds
    report = quantize(real_model(name), calibration=[feeds], dynamic=True, dynamic_granularity="tensor")
    kernels = report.result("quantize").data["kernels"]
    assert kernels["float"] == 0 and kernels["integer"] == 18
    assert set(kernels["counts"]) <= {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    sentence = next(o for o in report.result("quantize").data["report"]["outputs"] if o["name"] == "461")
    assert sentence["cosine"] > 0.99  # measured 0.9976 (per-token: 0.9996)


def test_placement_speed_leaves_slow_integer_convs_in_float() -> None:
    """Thin depthwise and 1x1 convs stay float (faster on ORT CPU); a squeeze-excite 1x1 conv does not."""
    rng = np.random.default_rng(2)

    def w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [w("wdw", (16, 1, 3, 3)), w("wpw", (16, 16, 1, 1)), w("wse", (16, 16, 1, 1)), w("wbig", (64, 16, 3, 3))]
    nodes = [
        helper.make_node("Conv", ["x", "wdw"], ["a"], name="dw", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wpw"], ["b"], name="pw"),
        helper.make_node("GlobalAveragePool", ["b"], ["p"], name="gap"),
        helper.make_node("Conv", ["p", "wse"], ["s"], name="se"),
        helper.make_node("HardSigmoid", ["s"], ["g"], name="hs"),
        helper.make_node("Mul", ["b", "g"], ["m"], name="scale"),
        helper.make_node("Conv", ["m", "wbig"], ["y"], name="big", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "placement",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"x": rng.standard_normal((2, 16, 8, 8)).astype(np.float32)}]
    result = quantize(model, calibration=calib, fuse=False).result("quantize")
    declined = dict(result.declined)
    assert set(result.changed) == {"se", "big"}
    assert "depthwise 3x3 conv with 16 channels" in declined["dw"] and "1x1 conv 16 -> 16" in declined["pw"]
    assert result.data["kernels"]["integer"] == 2, result.data["kernels"]
    everything = quantize(model, calibration=calib, fuse=False, placement="all").result("quantize")
    assert set(everything.changed) == {"dw", "pw", "se", "big"}
