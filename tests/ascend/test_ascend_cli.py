"""The command line: quantize --target ascend / ascend-qdq, verify-ascend, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.cli.main import main

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO, CALIB, HELDOUT = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz", MODELS / "digits_heldout.npz"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "d.onnx"
    assert main(["quantize", str(DEMO), "-o", str(out), "--calib", str(CALIB), "--target", "ascend", "-q"]) == 0
    return out


def test_verify_ascend_passes_on_a_fresh_run(cli_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-ascend", str(cli_run), "--data", str(HELDOUT), "--samples", "64"]) == 0
    text = capsys.readouterr().out
    assert "ran 64 samples" in text
    assert re.search(r"logits: max \|deploy - fake_quant\| 0 ", text)
    assert "record: every quantized node agrees with the deploy model" in text


def test_verify_ascend_fails_on_a_record_that_disagrees(
    cli_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for suffix in ("onnx", "fake_quant.onnx"):
        (tmp_path / f"d.{suffix}").write_bytes(cli_run.with_name(f"d.{suffix}").read_bytes())
    record = cli_run.with_name("d.record.txt").read_text()
    first = re.search(r"scale_d: (\S+)", record)
    assert first is not None
    tampered = record.replace(first.group(0), f"scale_d: {float(first.group(1)) * 1.001}", 1)
    (tmp_path / "d.record.txt").write_text(tampered)
    assert main(["verify-ascend", str(tmp_path / "d.onnx"), "--data", str(HELDOUT), "--samples", "16"]) == 1
    assert "record: conv1: AscendQuant scale" in capsys.readouterr().out


def test_verify_ascend_rejects_a_model_that_is_not_a_deploy_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-ascend", str(DEMO), "--data", str(HELDOUT)]) == 1
    err = capsys.readouterr().err.strip()
    assert "has no AscendDequant node" in err and "\n" not in err


def test_float_format_with_target_ascend_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["quantize", str(DEMO), "-o", str(tmp_path / "x.onnx"), "--calib", str(CALIB), "--target", "ascend"]
    assert main([*argv, "--weights", "hif8", "--activations", "hif8"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "hif8" in err and "simulation" in err
    assert not (tmp_path / "x.onnx").exists()


def test_ascend_qdq_writes_per_tensor_gemm_and_int8_activations(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(DEMO), "-o", str(out), "--calib", str(CALIB), "--target", "ascend-qdq", "-q"]) == 0
    model = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            scale = inits[dq.input[1]]
            assert inits[dq.input[2]].dtype == np.int8 and not inits[dq.input[2]].any()  # symmetric int8
            assert scale.shape == (() if node.op_type == "Gemm" else (inits[dq.input[0]].shape[0],))
            act = producers[node.input[0]]
            assert act.op_type == "DequantizeLinear" and inits[act.input[2]].dtype == np.int8
            q = producers[act.input[0]]
            assert q.op_type == "QuantizeLinear" and q.input[1:] == act.input[1:]  # the pair shares its scale
    assert {"conv1", "conv2", "conv3", "conv4", "fc1", "fc2"} <= set(nodes)
    held = np.load(HELDOUT)
    logits = ort.InferenceSession(str(out)).run(None, {"input": held["input"]})[0]
    float_logits = ort.InferenceSession(str(DEMO)).run(None, {"input": held["input"]})[0]
    assert (logits.argmax(1) == held["label"]).mean() >= (float_logits.argmax(1) == held["label"]).mean() - 0.02


def test_ascend_qdq_declines_non_float_model_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["x"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "ids.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", ids=np.arange(32, dtype=np.int64).reshape(8, 4))
    argv = ["quantize", str(path), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "calib.npz")]
    assert main([*argv, "--target", "ascend-qdq"]) == 1
    err = capsys.readouterr().err.strip()
    assert "model input 'ids' is int64" in err and "float32" in err and "\n" not in err


def test_simulation_with_target_ascend_points_to_the_fake_quant_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["quantize", str(DEMO), "-o", str(tmp_path / "x.onnx"), "--calib", str(CALIB), "--target", "ascend"]
    assert main([*argv, "--simulation", str(tmp_path / "sim.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert "OUT.fake_quant.onnx" in err and "\n" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_distill_takes_the_ascend_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.onnx"
    args = ["distill", str(DEMO), "-o", str(out), "--calib", str(CALIB), "--target", "ascend", "--iters", "60"]
    assert main(args) == 0
    assert re.search(r"distilled [4-6] of 6 blocks", capsys.readouterr().out)  # measured: 6 of 6
    assert main(["verify-ascend", str(out), "--data", str(HELDOUT), "--samples", "64"]) == 0
    assert "record: every quantized node agrees with the deploy model" in capsys.readouterr().out
