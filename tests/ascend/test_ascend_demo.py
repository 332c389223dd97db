"""quantize --target ascend on the demo CNN: deploy (reference interpreter) == fake-quant (onnxruntime), record == deploy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxcomp
from onnxcomp.quant.ascend.consistency import record_mismatches
from onnxcomp.quant.ascend.layers import quant_scale
from onnxcomp.quant.ascend.packing import deq_scale, pack_deq_scale
from onnxcomp.quant.ascend.record import parse_record
from onnxcomp.quant.ascend.reference import run_deploy

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO, CALIB, HELDOUT = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz", MODELS / "digits_heldout.npz"


def _session(path: Path, optimized: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if not optimized:  # no fusion folds deq into the weights: the float32 path is the integer path
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ascend") / "digits.onnx"
    before = hashlib.sha256(DEMO.read_bytes()).hexdigest()
    report = onnxcomp.quantize(DEMO, out, calibration=CALIB, target="ascend")
    assert hashlib.sha256(DEMO.read_bytes()).hexdigest() == before  # the input is never modified
    return {"out": out, "report": report}


def test_writes_deploy_fake_quant_and_record(demo_run: dict) -> None:
    out = demo_run["out"]
    assert out.with_name("digits.fake_quant.onnx").is_file()
    assert out.with_name("digits.record.txt").is_file()
    deploy = onnx.load(out)
    ops = [n.op_type for n in deploy.graph.node]
    assert ops.count("AscendQuant") == 6 and ops.count("AscendDequant") == 6
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert [(o.domain, o.version) for o in deploy.opset_import] == [("", 17)]  # ai.onnx only, 8..22
    assert 8 <= deploy.opset_import[0].version <= 22
    assert all(n.domain == "" for n in deploy.graph.node)
    inits = {t.name: numpy_helper.to_array(t) for t in deploy.graph.initializer}
    conv1 = next(n for n in deploy.graph.node if n.name == "conv1")
    assert inits[conv1.input[1]].dtype == np.int8 and inits[conv1.input[2]].dtype == np.int32
    assert inits["conv1.dequant.param"].dtype == np.uint64
    assert inits["conv1.dequant.param"].shape == (inits[conv1.input[1]].shape[0],)  # per channel
    fc = next(n for n in deploy.graph.node if n.op_type == "Gemm")
    assert inits[f"{fc.name}.dequant.param"].shape == (1,)  # Gemm: per tensor
    onnx.checker.check_model(onnx.load(out.with_name("digits.fake_quant.onnx")), full_check=True)


def test_deploy_on_the_reference_equals_fake_quant_on_onnxruntime(demo_run: dict) -> None:
    out = demo_run["out"]
    x = np.load(HELDOUT)["input"][:200]
    deploy = run_deploy(str(out), {"input": x})[0]
    fake = _session(out.with_name("digits.fake_quant.onnx")).run(None, {"input": x})[0]
    np.testing.assert_array_equal(deploy, fake)  # integer path exact, same float32 dequantization
    # onnxruntime's default fusions fold the deq Mul into float kernels: float rounding, an occasional code flip
    optimized = _session(out.with_name("digits.fake_quant.onnx"), optimized=True).run(None, {"input": x})[0]
    assert np.abs(optimized - deploy).max() < 0.05 * np.abs(deploy).max()
    assert (optimized.argmax(1) == deploy.argmax(1)).mean() >= 0.99


def test_fake_quant_accuracy_equals_the_qdq_output_within_noise(demo_run: dict, tmp_path: Path) -> None:
    held = np.load(HELDOUT)
    x, labels = held["input"], held["label"]
    qdq = tmp_path / "qdq.onnx"
    onnxcomp.quantize(DEMO, qdq, calibration=CALIB, reports=False)

    def accuracy(path: Path) -> float:
        return float((_session(path, optimized=True).run(None, {"input": x})[0].argmax(1) == labels).mean())

    fake, ort_qdq, fp32 = accuracy(demo_run["out"].with_name("digits.fake_quant.onnx")), accuracy(qdq), accuracy(DEMO)
    assert abs(fake - ort_qdq) <= 0.02, (fake, ort_qdq, fp32)
    assert fake >= fp32 - 0.02


def test_record_parses_and_reproduces_the_deploy_model_bit_for_bit(demo_run: dict) -> None:
    out = demo_run["out"]
    entries = parse_record(out.with_name("digits.record.txt").read_text())
    assert list(entries) == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"]
    deploy = onnx.load(out)
    assert record_mismatches(deploy, entries) == []
    nodes = {n.name: n for n in deploy.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in deploy.graph.initializer}
    for layer, value in entries.items():  # the same walk, spelled out for one attribute set per layer
        quant = nodes[f"{layer}.quant"] if f"{layer}.quant" in nodes else None
        if quant is not None:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in quant.attribute}
            assert np.float32(attrs["scale"]).view(np.uint32) == quant_scale(value.scale_d).view(np.uint32)
            assert attrs["offset"] == value.offset_d and attrs["dst_type"] == b"INT8"
        param = pack_deq_scale(deq_scale(np.float32(value.scale_d), np.array(value.scale_w, np.float32)))
        np.testing.assert_array_equal(inits[f"{layer}.dequant.param"], param)
        assert list(value.offset_w) == [0] * len(value.scale_w)


def test_record_walk_reports_a_tampered_deploy_model(demo_run: dict) -> None:
    out = demo_run["out"]
    entries = parse_record(out.with_name("digits.record.txt").read_text())
    deploy = onnx.load(out)
    param = next(t for t in deploy.graph.initializer if t.name == "conv2.dequant.param")
    values = numpy_helper.to_array(param).copy()
    values[0] += np.uint64(1)  # one ulp of channel 0's deq
    param.CopyFrom(numpy_helper.from_array(values, param.name))
    assert record_mismatches(deploy, entries) == [
        "conv2: AscendDequant parameter != pack(scale_d * scale_w) of the record"
    ]
    del entries["fc2"]
    assert "fc2: AscendDequant fc2.dequant has no record entry" in record_mismatches(deploy, entries)


def test_the_resolved_recipe_reproduces_all_three_files_byte_for_byte(demo_run: dict, tmp_path: Path) -> None:
    again = tmp_path / "digits.onnx"
    onnxcomp.compress(DEMO, demo_run["out"].with_name("digits.recipe.toml"), again, calibration=CALIB)
    first = demo_run["out"]
    for name in ("digits.onnx", "digits.fake_quant.onnx", "digits.record.txt"):
        assert again.with_name(name).read_bytes() == first.with_name(name).read_bytes(), name


def test_smoothquant_runs_first_and_both_models_carry_it(tmp_path: Path) -> None:
    out = tmp_path / "sq.onnx"
    report = onnxcomp.quantize(DEMO, out, calibration=CALIB, target="ascend", smoothquant=0.5, reports=False)
    assert report.result("quantize").stats["smoothquant"] == 6
    x = np.load(HELDOUT)["input"][:64]
    fake = _session(out.with_name("sq.fake_quant.onnx")).run(None, {"input": x})[0]
    np.testing.assert_array_equal(run_deploy(str(out), {"input": x})[0], fake)
    deploy = onnx.load(out)
    entries = parse_record(out.with_name("sq.record.txt").read_text())
    assert record_mismatches(deploy, entries) == []
    # tensor_balance_factor: the per-input-channel s of each layer. The deploy weight (codes * scale_w) is the
    # fused float weight * s[i] / t[o], t[o] the factor of the layer downstream that folded 1/t into this one
    fused_model = onnxcomp.fuse(DEMO).model
    fused = {n.name: n for n in fused_model.graph.node}
    fused_inits = {t.name: numpy_helper.to_array(t) for t in fused_model.graph.initializer}
    inits = {t.name: numpy_helper.to_array(t) for t in deploy.graph.initializer}
    nodes = {n.name: n for n in deploy.graph.node}
    downstream = {"conv1": "conv2", "fc1": "fc2"}  # the others are read through a pool: a Mul carries 1/s
    for layer, value in entries.items():
        s = np.array(value.tensor_balance_factor, np.float64)
        w = fused_inits[fused[layer].input[1]].astype(np.float64)
        if w.ndim == 2:  # Gemm with transB: (N, K) like a conv's (C_out, C_in)
            assert any(a.name == "transB" and a.i == 1 for a in nodes[layer].attribute)
        assert s.size == w.shape[1] and np.isfinite(s).all() and (s > 0).all() and not np.allclose(s, 1.0)
        t = np.ones(w.shape[0])
        if layer in downstream:
            t = np.array(entries[downstream[layer]].tensor_balance_factor, np.float64)
        scale_w = np.array(value.scale_w, np.float64).reshape([-1] + [1] * (w.ndim - 1))
        codes = inits[nodes[layer].input[1]].astype(np.float64)
        expected = w * s.reshape([1, -1] + [1] * (w.ndim - 2)) / t.reshape([-1] + [1] * (w.ndim - 1))
        assert np.all(np.abs(codes * scale_w - expected) <= 0.5001 * scale_w), layer


@pytest.mark.parametrize(
    ("keyword", "value", "flag"),
    [("embeddings", "int8", "--quantize-embeddings")],
)
def test_options_the_target_does_not_carry_out_are_a_one_line_error(
    tmp_path: Path, keyword: str, value: str, flag: str
) -> None:
    with pytest.raises(onnxcomp.errors.OnnxCompError) as info:
        onnxcomp.quantize(DEMO, tmp_path / "x.onnx", calibration=CALIB, target="ascend", **{keyword: value})
    assert flag in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "x.onnx").exists()
