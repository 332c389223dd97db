"""Every ATC layer constraint has a model declined with its reason; formats and opsets ATC cannot take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp.errors import OnnxCompError
from onnxcomp.quant.ascend.consistency import record_mismatches
from onnxcomp.quant.ascend.record import parse_record
from onnxcomp.quant.ascend.reference import run_deploy

RNG = np.random.default_rng(7)


def _model(nodes: list, inputs: list, output: tuple[str, list], inits: dict, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _w(*shape: int, scale: float = 0.3) -> np.ndarray:
    return RNG.standard_normal(shape) * scale


def _quantize(model: onnx.ModelProto, tmp_path: Path, feeds: dict, **kw: object) -> tuple[object, Path]:
    out = tmp_path / "out.onnx"
    report = onnxcomp.quantize(model, out, calibration=[feeds], target="ascend", reports=False, fuse=False, **kw)
    return report, out


def _declined(report: object) -> dict[str, str]:
    return dict(report.result("quantize").declined)  # type: ignore[attr-defined]


def _agree(out: Path, feeds: dict, int4: set[str] | None = None) -> None:
    """The deploy model on the reference interpreter == the fake-quant model on onnxruntime, and == its record."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fake = ort.InferenceSession(str(out.with_name("out.fake_quant.onnx")), so).run(None, feeds)
    deploy = run_deploy(str(out), feeds, int4)
    for a, b in zip(deploy, fake, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))
    entries = parse_record(out.with_name("out.record.txt").read_text())
    assert record_mismatches(onnx.load(out), entries) == []


def _x(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def test_gemm_trans_a_and_alpha_are_declined(tmp_path: Path) -> None:
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="gemm_transA", transA=1),
            helper.make_node("Gemm", ["h", "w2"], ["h2"], name="gemm_alpha", alpha=0.5),
            helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], name="gemm_ok", transB=1),
        ],
        [("x", [8, 4])],
        ("y", [4, 3]),
        {"w1": _w(8, 5), "w2": _w(5, 6), "w3": _w(3, 6), "b3": _w(3)},
    )
    feeds = {"x": _x(8, 4)}
    report, out = _quantize(model, tmp_path, feeds)
    declined = _declined(report)
    assert declined["gemm_transA"] == "Gemm with transA = 1: ATC quantizes Gemm only with transA = 0"
    assert declined["gemm_alpha"].startswith("Gemm with alpha or beta != 1")
    assert report.result("quantize").changed == ["gemm_ok"]  # type: ignore[attr-defined]
    _agree(out, feeds)


def test_matmul_with_a_3d_weight_is_declined(tmp_path: Path) -> None:
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w3d"], ["h"], name="matmul_3d"),
            helper.make_node("MatMul", ["h", "w2d"], ["y"], name="matmul_ok"),
        ],
        [("x", [2, 3, 4])],
        ("y", [2, 3, 6]),
        {"w3d": _w(2, 4, 5), "w2d": _w(5, 6)},
    )
    feeds = {"x": _x(2, 3, 4)}
    report, out = _quantize(model, tmp_path, feeds)
    assert _declined(report)["matmul_3d"] == "MatMul weight of rank 3: ATC needs a 2-D constant second input"
    _agree(out, feeds)


def test_conv_transpose_dilation_and_5d_filter_are_declined(tmp_path: Path) -> None:
    model = _model(
        [
            helper.make_node("ConvTranspose", ["x", "wd"], ["h"], name="deconv_dilated", dilations=[2, 2]),
            helper.make_node("ConvTranspose", ["h", "wok", "bok"], ["y"], name="deconv_ok", strides=[2, 2]),
        ],
        [("x", [1, 4, 5, 5])],
        ("y", [1, 2, 18, 18]),
        {"wd": _w(4, 3, 3, 3), "wok": _w(3, 2, 2, 2), "bok": _w(2)},
    )
    feeds = {"x": _x(1, 4, 5, 5)}
    report, out = _quantize(model, tmp_path, feeds)
    assert _declined(report)["deconv_dilated"] == "ConvTranspose with dilation != 1: ATC needs dilation 1"
    assert report.result("quantize").changed == ["deconv_ok"]  # type: ignore[attr-defined]
    _agree(out, feeds)
    model3d = _model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv_3d")],
        [("x", [1, 2, 3, 4, 4])],
        ("y", [1, 2, 4, 5, 5]),
        {"w": _w(2, 2, 2, 2, 2)},
    )
    report, _ = _quantize(model3d, tmp_path / "..", {"x": _x(1, 2, 3, 4, 4)}, force=True)
    assert _declined(report)["deconv_3d"] == "ConvTranspose with a 5-D filter: ATC needs a 4-D filter"


def test_3d_conv_with_depth_dilation_is_declined(tmp_path: Path) -> None:
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv3d", dilations=[2, 1, 1])],
        [("x", [1, 2, 5, 4, 4])],
        ("y", [1, 3, 3, 3, 3]),
        {"w": _w(3, 2, 2, 2, 2)},
    )
    report, _ = _quantize(model, tmp_path, {"x": _x(1, 2, 5, 4, 4)})
    assert _declined(report)["conv3d"] == "3-D Conv with dilation_d != 1: ATC needs dilation_d = 1"


def test_non_constant_weight_is_declined(tmp_path: Path) -> None:
    model = _model(
        [
            helper.make_node("Conv", ["x", "w_in"], ["h"], name="conv_dynamic_w", pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["h", "w"], ["y"], name="conv_ok"),
        ],
        [("x", [1, 2, 5, 5]), ("w_in", [3, 2, 3, 3])],
        ("y", [1, 4, 5, 5]),
        {"w": _w(4, 3, 1, 1)},
    )
    feeds = {"x": _x(1, 2, 5, 5), "w_in": _x(3, 2, 3, 3)}
    report, out = _quantize(model, tmp_path, feeds)
    assert _declined(report)["conv_dynamic_w"] == "the weight 'w_in' of Conv 'conv_dynamic_w' is not a constant"
    _agree(out, feeds)


def test_int16_activations_only_for_conv_gemm_conv_transpose(tmp_path: Path) -> None:
    model = _model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv16", pads=[1, 1, 1, 1]),
            helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
            helper.make_node("MatMul", ["f", "wm"], ["y"], name="matmul16"),
        ],
        [("x", [2, 3, 4, 4])],
        ("y", [2, 5]),
        {"w": _w(4, 3, 3, 3), "b": _w(4), "wm": _w(64, 5)},
    )
    feeds = {"x": _x(2, 3, 4, 4)}
    report, out = _quantize(model, tmp_path, feeds, activations="int16")
    assert _declined(report)["matmul16"] == "ATC takes INT16 activations only for Conv, ConvTranspose, Gemm, not MatMul"
    deploy = onnx.load(out)
    quant = next(n for n in deploy.graph.node if n.op_type == "AscendQuant")
    assert helper.get_attribute_value(quant.attribute[-1]) == b"INT16"  # dst_type
    _agree(out, feeds)


def test_int32_bias_overflow_is_declined(tmp_path: Path) -> None:
    model = _model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv_big_bias"),
            helper.make_node("Conv", ["h", "w2"], ["y"], name="conv_ok"),
        ],
        [("x", [1, 2, 4, 4])],
        ("y", [1, 2, 4, 4]),
        {"w": _w(3, 2, 1, 1, scale=1e-4), "b": np.array([1e5, 0.0, -1.0]), "w2": _w(2, 3, 1, 1)},
    )
    feeds = {"x": _x(1, 2, 4, 4) * 1e-3}
    report, out = _quantize(model, tmp_path, feeds)
    reason = _declined(report)["conv_big_bias"]
    assert reason.startswith("int32 bias overflow") and reason.endswith("add the layer to the skip list")
    _agree(out, feeds)


def test_int4_weights_pack_and_decline_odd_input_channels(tmp_path: Path) -> None:
    model = _model(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv_odd", pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="conv_even", pads=[1, 1, 1, 1]),
        ],
        [("x", [2, 3, 6, 6])],
        ("y", [2, 4, 6, 6]),
        {"w1": _w(4, 3, 3, 3), "b1": _w(4), "w2": _w(4, 4, 3, 3), "b2": _w(4)},
    )
    feeds = {"x": _x(2, 3, 6, 6)}
    with pytest.raises(OnnxCompError, match="--ascend-int4"):
        _quantize(model, tmp_path, feeds, weights="int4")
    report, out = _quantize(model, tmp_path, feeds, weights="int4", ascend_int4=True)
    assert _declined(report)["conv_odd"] == "INT4 weights need an even input-channel count (C_in = 3 is odd)"
    deploy = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in deploy.graph.initializer}
    conv = next(n for n in deploy.graph.node if n.name == "conv_even")
    assert inits[conv.input[1]].shape == (4, 2, 3, 3) and inits[conv.input[1]].dtype == np.int8  # C_in halved
    cast = next(n for n in deploy.graph.node if n.output[0] == conv.input[2])
    assert (cast.op_type, cast.name) == ("Cast", "conv_even.bias_quant")
    assert parse_record(out.with_name("out.record.txt").read_text())["conv_even"].wts_type == "INT4"
    _agree(out, feeds, int4={"conv_even"})
    _agree(out, feeds)  # without the record: the bias_quant Cast marks the INT4 layer


@pytest.mark.parametrize("fmt", ["hif8", "fp8_e4m3", "mxfp4", "fp4_e2m1", "mxfp8"])
def test_float_formats_are_a_one_line_error_pointing_to_the_simulation(tmp_path: Path, fmt: str) -> None:
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [("x", [1, 2, 4, 4])], ("y", [1, 3, 2, 2]),
                   {"w": _w(3, 2, 3, 3)})  # fmt: skip
    with pytest.raises(OnnxCompError) as info:
        _quantize(model, tmp_path, {"x": _x(1, 2, 4, 4)}, weights=fmt, activations="int8")
    message = str(info.value)
    assert "\n" not in message and fmt in message and "simulation" in message


def test_newer_opsets_are_converted_down_to_22_and_old_ones_stay_in_range(tmp_path: Path) -> None:
    def conv(opset: int) -> onnx.ModelProto:
        return _model(
            [helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
            [("x", [1, 2, 4, 4])],
            ("y", [1, 3, 2, 2]),
            {"w": _w(3, 2, 3, 3)},
            opset,
        )

    feeds = {"x": _x(1, 2, 4, 4)}
    for opset, expected in ((11, 13), (22, 22), (23, 22), (24, 22)):
        report, out = _quantize(conv(opset), tmp_path, feeds, force=True)
        assert onnx.load(out).opset_import[0].version == expected
        assert onnx.load(out.with_name("out.fake_quant.onnx")).opset_import[0].version == expected
        if opset > 22:
            assert f"converted opset {opset} -> 22 (ATC registers the Ascend ops for 8..22)" in (
                report.result("quantize").notes  # type: ignore[attr-defined]
            )
        _agree(out, feeds)


def test_a_maxpool_reading_a_quantized_tensor_reads_it_through_ascend_antiquant(tmp_path: Path) -> None:
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w1"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
            helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["p", "w2"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        ],
        [("x", [2, 3, 6, 6])],
        ("y", [2, 4, 6, 6]),
        {"w1": _w(4, 3, 3, 3), "w2": _w(4, 3, 3, 3)},
    )
    feeds = {"x": _x(2, 3, 6, 6)}
    _, out = _quantize(model, tmp_path, feeds)
    deploy = onnx.load(out)
    producers = {o: n for n in deploy.graph.node for o in n.output}
    pool = next(n for n in deploy.graph.node if n.op_type == "MaxPool")
    anti = producers[pool.input[0]]
    assert (anti.op_type, anti.name) == ("AscendAntiQuant", "conv_a.antiquant")
    assert producers[anti.input[0]].name == "conv_a.quant"
    _agree(out, feeds)  # the fake-quant MaxPool reads Mul(fake-quantized integers, scale_d): the same numbers


def test_unnamed_and_duplicate_named_nodes_get_names_the_record_keys_on(tmp_path: Path) -> None:
    model = _model(
        [
            helper.make_node("Conv", ["x", "w1"], ["h"]),
            helper.make_node("Conv", ["h", "w2"], ["h2"], name="same"),
            helper.make_node("Conv", ["h2", "w3"], ["y"], name="same"),
        ],
        [("x", [1, 2, 6, 6])],
        ("y", [1, 3, 6, 6]),
        {"w1": _w(3, 2, 1, 1), "w2": _w(3, 3, 1, 1), "w3": _w(3, 3, 1, 1)},
    )
    feeds = {"x": _x(1, 2, 6, 6)}
    report, out = _quantize(model, tmp_path, feeds)
    entries = parse_record(out.with_name("out.record.txt").read_text())
    assert list(entries) == ["Conv", "same", "same_1"]
    assert "named 2 unnamed or duplicate-named nodes" in report.result("quantize").notes[0]  # type: ignore[attr-defined]
    _agree(out, feeds)
