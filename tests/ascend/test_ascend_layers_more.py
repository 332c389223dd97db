"""--target ascend on layers beyond Conv/Gemm: a MatMul's bias Add in the integer path, float16 models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp.quant.ascend.consistency import record_mismatches
from onnxcomp.quant.ascend.record import parse_record
from onnxcomp.quant.ascend.reference import deploy_session


def _fake(path: Path, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(outputs, feeds)


def _save(nodes: list, inits: dict[str, np.ndarray], x_shape: list, y_shape: list, path: Path) -> Path:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _token_mlp(path: Path) -> Path:
    """x (B, 6, 8) -> MatMul + Add -> Relu -> MatMul + Add (bias (1, 1, 4)) -> y: 3-D, so no Gemm fusion."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.normal(0, 0.4, (8, 16)).astype(np.float32),
        "b1": rng.normal(0, 0.5, (16,)).astype(np.float32),
        "w2": rng.normal(0, 0.3, (16, 4)).astype(np.float32),
        "b2": rng.normal(0, 0.5, (1, 1, 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["b2", "m2"], ["y"], name="fc2_bias"),  # bias first: either order folds
    ]
    return _save(nodes, inits, ["B", 6, 8], ["B", 6, 4], path)


def test_matmul_bias_add_goes_into_the_integer_path(tmp_path: Path) -> None:
    model = _token_mlp(tmp_path / "mlp.onnx")
    x = np.random.default_rng(1).normal(0.2, 1.0, (32, 6, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q.onnx"
    onnxcomp.quantize(model, out, calibration=tmp_path / "calib.npz", target="ascend", reports=False)
    deploy = onnx.load(out)
    nodes = {n.name: n for n in deploy.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in deploy.graph.initializer}
    for layer, add in (
        ("fc1", "fc1_bias"),
        ("fc2", "fc2_bias"),
    ):  # AscendQuant -> MatMul -> Add(int32) -> AscendDequant
        assert nodes[layer].output[0] == f"{layer}.int_out" and f"{layer}.int_out" in nodes[add].input
        bias = next(inits[i] for i in nodes[add].input if i in inits)
        assert bias.dtype == np.int32 and bias.shape == (16 if layer == "fc1" else 4,)
        assert nodes[f"{layer}.dequant"].input[0] == nodes[add].output[0] == f"{layer}.bias_out"
    assert record_mismatches(deploy, parse_record((tmp_path / "q.record.txt").read_text())) == []
    # the int32 sums (MatMul + bias) of both models agree exactly, and so do the outputs
    wanted = ["fc1.bias_out", "fc2.bias_out", "y"]
    fake_model = onnx.load(tmp_path / "q.fake_quant.onnx")
    fake_model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in wanted[:2])
    onnx.save(fake_model, tmp_path / "probe.onnx")
    fake = dict(zip(wanted, _fake(tmp_path / "probe.onnx", {"x": x}, wanted), strict=True))
    ref = deploy_session(str(out)).run(None, {"x": x}, intermediate=True)
    for name in wanted[:2]:
        assert ref[name].dtype == np.int32
        np.testing.assert_array_equal(ref[name], fake[name].astype(np.int32))
    np.testing.assert_array_equal(ref["y"], fake["y"])
    float_y = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(fake["y"] - float_y).max() < 0.05 * np.abs(float_y).max()


def test_bias_correction_corrects_a_matmul_through_its_bias_add(tmp_path: Path) -> None:
    model = _token_mlp(tmp_path / "mlp.onnx")
    x = np.random.default_rng(1).normal(0.2, 1.0, (32, 6, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "bc.onnx"
    onnxcomp.quantize(model, out, calibration=tmp_path / "calib.npz", target="ascend", bias_correction="full")
    entries = {e["node"]: e for e in json.loads((tmp_path / "bc.quant_record.json").read_text())}
    assert entries["fc1"]["bias_correction"]["site"] == "bias Add"
    assert entries["fc2"]["bias_correction"]["level"] == 1
    np.testing.assert_array_equal(
        deploy_session(str(out)).run(None, {"x": x})[0], _fake(tmp_path / "bc.fake_quant.onnx", {"x": x})[0]
    )
    assert record_mismatches(onnx.load(out), parse_record((tmp_path / "bc.record.txt").read_text())) == []


MODELS = Path(__file__).resolve().parents[2] / "models"


def _float16_demo(folder: Path) -> tuple[Path, Path]:
    """The demo CNN with float16 weights, input and output, and float16 calibration data."""
    model = onnx.load(MODELS / "digits_cnn.onnx")
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*model.graph.input, *model.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, folder / "f16.onnx")
    calib = np.load(MODELS / "digits_calib.npz")
    np.savez(folder / "calib16.npz", **{k: v.astype(np.float16) for k, v in calib.items()})
    return folder / "f16.onnx", folder / "calib16.npz"


def test_a_float16_model_is_quantized_in_float32_with_its_float16_interface(tmp_path: Path) -> None:
    model, calib = _float16_demo(tmp_path)
    before = model.read_bytes()
    out = tmp_path / "q.onnx"
    report = onnxcomp.quantize(model, out, calibration=calib, target="ascend", reports=False)
    step = report.result("quantize")
    assert step.stats["nodes"] == 6 and not step.declined
    assert any(note.startswith("float16 model: computed in float32") for note in step.notes)
    assert model.read_bytes() == before
    deploy = onnx.load(out)
    assert [v.type.tensor_type.elem_type for v in [*deploy.graph.input, *deploy.graph.output]] == [
        TensorProto.FLOAT16
    ] * 2
    assert deploy.graph.node[0].op_type == "Cast" and deploy.graph.node[1].op_type == "AscendQuant"
    assert not any(t.data_type == TensorProto.FLOAT16 for t in deploy.graph.initializer)
    assert record_mismatches(deploy, parse_record((tmp_path / "q.record.txt").read_text())) == []
    held = np.load(MODELS / "digits_heldout.npz")
    x, labels = held["input"].astype(np.float16), held["label"]
    fake = _fake(tmp_path / "q.fake_quant.onnx", {"input": x})[0]
    assert fake.dtype == np.float16
    np.testing.assert_array_equal(deploy_session(str(out)).run(None, {"input": x})[0], fake)
    float16_y = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert (fake.argmax(1) == labels).mean() >= (float16_y.argmax(1) == labels).mean() - 0.005


def test_a_float16_model_with_a_float16_op_type_is_declined_in_one_line(tmp_path: Path) -> None:
    w = np.random.default_rng(0).normal(0, 0.5, (4, 3)).astype(np.float16)
    nodes = [
        helper.make_node("EyeLike", ["x"], ["eye"], name="eye", dtype=TensorProto.FLOAT16),
        helper.make_node("Add", ["x", "eye"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "w"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "f16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 3])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.eye(4, dtype=np.float16))
    try:
        onnxcomp.quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", calibration=tmp_path / "c.npz", target="ascend")
    except onnxcomp.errors.OnnxCompError as exc:
        message = str(exc)
    else:
        raise AssertionError("a float16 EyeLike was not declined")
    assert "EyeLike 'eye' makes float16 values" in message and "convert it to float32 first" in message
    assert "\n" not in message and not (tmp_path / "q.onnx").exists()


def _pooled_cnn(path: Path) -> Path:
    """Conv -> Relu -> AveragePool 2x2 -> Conv -> AveragePool 3x3 (pads, count_include_pad 0) -> y."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, (8,)).astype(np.float32),
        "w2": rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("AveragePool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2"),
        helper.make_node("AveragePool", ["c2"], ["y"], name="pool2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    return _save(nodes, inits, ["N", 3, 8, 8], ["N", 4, 4, 4], path)


def _with_avgpool(model: Path, out: Path, calib: Path, avgpool: bool) -> onnxcomp.framework.RunReport:
    quantize = onnxcomp.framework.make_pass("quantize", {"target": "ascend", "ascend_avgpool": avgpool})
    return onnxcomp.compress(model, [quantize], out, calibration=calib)


def test_average_pool_is_quantized_behind_its_option(tmp_path: Path) -> None:
    model = _pooled_cnn(tmp_path / "pool.onnx")
    x = np.random.default_rng(1).normal(0.2, 1.0, (32, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    _with_avgpool(model, tmp_path / "plain.onnx", tmp_path / "calib.npz", False)
    assert not any(
        n.op_type == "AscendQuant" and n.name.startswith("pool") for n in onnx.load(tmp_path / "plain.onnx").graph.node
    )
    out = tmp_path / "q.onnx"
    _with_avgpool(model, out, tmp_path / "calib.npz", True)
    deploy = onnx.load(out)
    nodes = {n.name: n for n in deploy.graph.node}
    for pool in ("pool1", "pool2"):  # AscendQuant -> AveragePool -> AscendDequant(deq = scale_d)
        assert nodes[f"{pool}.quant"].op_type == "AscendQuant" and nodes[pool].input[0] == f"{pool}.quant.out"
        assert nodes[f"{pool}.dequant"].input[0] == nodes[pool].output[0]
    record = parse_record((tmp_path / "q.record.txt").read_text())
    assert list(record) == ["conv1", "pool1", "conv2", "pool2"] and list(record["pool1"].scale_w) == [1.0]
    assert record_mismatches(deploy, record) == []
    fake = _fake(tmp_path / "q.fake_quant.onnx", {"x": x})[0]
    np.testing.assert_array_equal(deploy_session(str(out)).run(None, {"x": x})[0], fake)
    float_y = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(fake - float_y).max() < 0.05 * np.abs(float_y).max()
