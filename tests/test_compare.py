"""``onnxcomp compare`` and the end-of-run verdict: figures checked against direct computations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.analysis.compare import sample_feeds
from onnxcomp.analysis.local_error import plan_local_error
from onnxcomp.analysis.metrics import cosine, predict, sqnr_db
from onnxcomp.api import compare, quantize
from onnxcomp.cli.main import main
from onnxcomp.runtime import ort_session, with_outputs

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
HELDOUT = MODELS / "digits_heldout.npz"
CALIB = MODELS / "digits_calib.npz"


@pytest.fixture(scope="module")
def digits_w8a8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "digits_int8.onnx"
    quantize(DIGITS, out, calibration=CALIB, reports=False)
    return out


def test_output_figures_match_a_direct_computation(digits_w8a8: Path) -> None:
    report = compare(DIGITS, digits_w8a8, HELDOUT, runs=3, batch_size=32)
    data = np.load(HELDOUT)
    images, labels = data["input"], data["label"]
    ref = predict(onnx.load(str(DIGITS)), {"input": images}, batch=32)
    cand = predict(onnx.load(str(digits_w8a8)), {"input": images}, batch=32)
    (out,) = report.outputs
    assert out.name == "logits"
    assert out.cosine == pytest.approx(cosine(ref, cand), abs=1e-9)
    assert out.sqnr_db == pytest.approx(sqnr_db(ref, cand), abs=1e-6)
    assert out.max_abs == pytest.approx(float(np.abs(ref.astype(np.float64) - cand).max()), rel=1e-6)
    assert out.top1_agreement == pytest.approx(float((ref.argmax(-1) == cand.argmax(-1)).mean()))
    assert report.accuracy["reference"] == pytest.approx(float((ref.argmax(-1) == labels).mean() * 100))
    assert report.accuracy["candidate"] == pytest.approx(float((cand.argmax(-1) == labels).mean() * 100))
    assert 30 < out.sqnr_db < 80 and out.top1_agreement > 0.97  # W8A8 of a small CNN: close, not exact
    assert report.sizes == {"reference": DIGITS.stat().st_size, "candidate": digits_w8a8.stat().st_size}
    assert report.latency is not None and report.latency.runs == 3
    assert report.latency.ratio == pytest.approx(report.latency.candidate_ms / report.latency.reference_ms)


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _dequantize(model: onnx.ModelProto, tensor: str) -> np.ndarray:
    """The value of a DequantizeLinear output over initializers, in numpy (per-axis when the scale is a vector)."""
    node = next(n for n in model.graph.node if tensor in n.output and n.op_type == "DequantizeLinear")
    q, scale, zero = (_initializer(model, name).astype(np.float64) for name in node.input)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if scale.ndim:
        shape[axis] = -1
    return ((q - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)


def test_local_error_of_a_node_matches_a_direct_computation(digits_w8a8: Path) -> None:
    """conv2 fed the float model's relu1_out, quantized by hand with the candidate's grid, vs the float bn2_out."""
    reference, candidate = onnx.load(str(DIGITS)), onnx.load(str(digits_w8a8))
    report = compare(DIGITS, digits_w8a8, HELDOUT, runs=0, batch_size=32, node_batches=2)
    row = next(n for n in report.nodes if n.node == "conv2")
    assert (row.op, row.tensor, report.node_batches) == ("Conv", "bn2_out", 2)

    images = np.load(HELDOUT)["input"][:64]  # the first two batches of 32
    session = ort_session(with_outputs(reference, ["relu1_out", "bn2_out"]), level="disable")
    relu1, bn2 = session.run(["relu1_out", "bn2_out"], {"input": images})
    scale = float(_initializer(candidate, "relu1_out_scale"))
    zero = float(_initializer(candidate, "relu1_out_zero_point"))
    x = ((np.clip(np.round(relu1 / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)
    conv2 = next(n for n in candidate.graph.node if n.name == "conv2")
    weight, bias = _dequantize(candidate, conv2.input[1]), _dequantize(candidate, conv2.input[2])
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["x", "w", "b"], ["y"], **{a.name: helper.get_attribute_value(a) for a in conv2.attribute}
            )
        ],
        "conv2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    single = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    local = ort_session(single, level="disable").run(None, {"x": x})[0]
    assert row.local_sqnr_db == pytest.approx(sqnr_db(bn2, local), abs=1e-3)
    assert row.local_cosine == pytest.approx(cosine(bn2, local), abs=1e-9)
    assert row.local_max_abs == pytest.approx(float(np.abs(bn2 - local).max()), rel=1e-4)
    # the culprit view: the cumulative error of the last conv carries its inputs' error, the local one does not
    conv4 = next(n for n in report.nodes if n.node == "conv4")
    assert conv4.cumulative_sqnr_db < conv4.local_sqnr_db
    exact = {n.node for n in report.nodes if n.local_sqnr_db == float("inf")}
    assert {"relu1", "relu2"} <= exact  # a Relu fed the float Conv output computes the same values


def test_cli_prints_the_table_and_writes_json(
    digits_w8a8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp.json"
    assert (
        main(["compare", str(DIGITS), str(digits_w8a8), "--data", str(HELDOUT), "--runs", "5", "--json", str(out)]) == 0
    )
    text = capsys.readouterr().out
    for header in ("cosine", "SQNR dB", "max abs", "top-1 agree", "local SQNR dB", "cumulative SQNR dB"):
        assert header in text
    assert re.search(r"^logits\s+0\.99\d+\s+\d+\.\d\d\s", text, re.M)
    assert re.search(r"median of 5 interleaved runs\): reference [\d.]+ ms, candidate [\d.]+ ms, ratio [\d.]+x", text)
    assert "accuracy on the labels: reference" in text
    data = json.loads(out.read_text())
    assert data["outputs"][0]["name"] == "logits" and data["latency"]["runs"] == 5
    assert {n["node"] for n in data["nodes"]} >= {"conv1", "conv2", "conv3", "conv4", "fc1", "fc2"}
    assert data["sizes"]["candidate"] == digits_w8a8.stat().st_size


def test_graphs_that_do_not_match_are_said_so(tmp_path: Path) -> None:
    """A candidate with renamed tensors: outputs compared, per-node error skipped with a reason."""
    model = _matmul_model()
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node[0].output[0] = "t_renamed"
    renamed.graph.node[1].input[0] = "t_renamed"
    assert plan_local_error(model, renamed).targets[0].tensor == "y"
    data = {"x": np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)}
    report = compare(model, renamed, data, runs=0)
    assert report.outputs[0].sqnr_db == float("inf") and report.outputs[0].cosine == pytest.approx(1.0)
    assert [n.node for n in report.nodes] == ["relu"] and report.nodes[0].local_sqnr_db == float("inf")
    other = onnx.ModelProto()
    other.CopyFrom(renamed)
    other.graph.node[1].output[0] = "y2"
    other.graph.output[0].name = "y2"
    with pytest.raises(Exception, match="shares no tensor output"):
        compare(model, other, data, runs=0)


def test_mismatched_inputs_are_refused() -> None:
    model = _matmul_model()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.input[0].name = "z"
    other.graph.node[0].input[0] = "z"
    with pytest.raises(Exception, match="compare needs two models with the same inputs"):
        compare(model, other, {"x": np.zeros((2, 4), np.float32)}, runs=0)


def _matmul_model(n: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"), helper.make_node("Relu", ["t"], ["y"], name="relu")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _relu_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _verdict(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[str, str]:
    assert main(argv) == 0
    captured = capsys.readouterr()
    (line,) = [x for x in captured.out.splitlines() if x.startswith("verdict: ")]
    return line, captured.err


def test_verdict_gives_the_size_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "digits.onnx", tmp_path / "w8.onnx"
    src.write_bytes(DIGITS.read_bytes())
    line, err = _verdict(capsys, ["quantize", str(src), "-o", str(out), "--activations", "none", "--no-report"])
    ratio = float(re.match(r"verdict: output ([\d.]+)x the input's size", line).group(1))  # type: ignore[union-attr]
    assert ratio == pytest.approx(out.stat().st_size / src.stat().st_size, abs=0.005)
    assert ratio < 0.35 and "warning" not in err


def test_verdict_warns_when_the_output_is_larger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Per-channel INT8 of a 4x4 weight: codes, scales and zero points outweigh 64 bytes of floats."""
    src, out = tmp_path / "tiny.onnx", tmp_path / "tiny.w8.onnx"
    onnx.save(_matmul_model(), str(src))
    argv = ["quantize", str(src), "-o", str(out), "--activations", "none", "--weight-only-format", "dq", "--no-report"]
    line, err = _verdict(capsys, argv)
    grown = out.stat().st_size - src.stat().st_size
    assert grown > 0 and f"({src.stat().st_size} B -> {out.stat().st_size} B)" in line
    assert f"warning: the output is larger than the input (+{grown} B" in err


def test_verdict_warns_when_nothing_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "relu.onnx", tmp_path / "relu.q.onnx"
    onnx.save(_relu_model(), str(src))
    line, err = _verdict(capsys, ["quantize", str(src), "-o", str(out), "--activations", "none", "--no-report"])
    assert line.startswith("verdict: output 1.00x the input's size")
    assert "warning: nothing changed: no pass modified the model; quantize: no node to quantize" in err


def test_verdict_measures_latency_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "digits.onnx", tmp_path / "int8.onnx"
    src.write_bytes(DIGITS.read_bytes())
    argv = ["quantize", str(src), "-o", str(out), "--calib", str(CALIB), "--calib-samples", "32", "--no-report"]
    line, _ = _verdict(capsys, [*argv, "--measure"])
    match = re.search(
        r", latency ([\d.]+)x \(([\d.]+) ms -> ([\d.]+) ms; onnxruntime CPU, 1 thread, median of 50", line
    )
    assert match is not None
    ratio, before, after = (float(g) for g in match.groups())
    assert ratio == pytest.approx(after / before, rel=0.05, abs=0.01)


def test_sample_feeds_follow_the_declared_shapes() -> None:
    feeds = sample_feeds(onnx.load(str(DIGITS)))
    assert list(feeds) == ["input"] and feeds["input"].shape[1:] == (1, 16, 16) and feeds["input"].dtype == np.float32


def test_state_input_samples_on_its_batch_axis() -> None:
    """An RNN-like state [2, B, 4] beside x [B, 4]: compared per sample along axis 1, timed on one sample."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["state", "axes"], ["s"], name="sum", keepdims=0),
            helper.make_node("Add", ["x", "s"], ["y"], name="add"),
        ],
        "stateful",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
        [numpy_helper.from_array(np.array([0], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rng = np.random.default_rng(2)
    data = {
        "x": rng.standard_normal((6, 4)).astype(np.float32),
        "state": rng.standard_normal((2, 6, 4)).astype(np.float32),
    }
    report = compare(model, model, data, runs=2, batch_size=4)
    assert report.data.endswith("(6 samples)") and report.outputs[0].sqnr_db == float("inf")
    assert report.latency is not None and report.latency.runs == 2


def test_verdict_names_the_command_pass_that_changed_nothing(
    conv_bn_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fusions folded the BatchNorm but every node was skipped: the run did not quantize, and says so."""
    out = tmp_path / "q.onnx"
    argv = ["quantize", str(conv_bn_path), "-o", str(out), "--activations", "none", "--skip", "*", "--no-report"]
    _, err = _verdict(capsys, argv)
    assert "warning: quantize changed nothing (only " in err and "fold_batchnorm" in err
    # `fuse` is all fusions: a run that folded something has nothing to warn about
    _, err = _verdict(capsys, ["fuse", str(conv_bn_path), "-o", str(tmp_path / "f.onnx")])
    assert err == ""
