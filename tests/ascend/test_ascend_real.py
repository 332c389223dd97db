"""Real models: deploy (reference interpreter) == fake-quant (onnxruntime); cls accuracy equals the QDQ output's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from real_models import make_inputs, real_model

import onnxcomp
from onnxcomp.quant.ascend.consistency import record_mismatches
from onnxcomp.quant.ascend.record import parse_record
from onnxcomp.quant.ascend.reference import deploy_session


def _fake_quant(path: Path, feeds: dict, optimized: bool = False) -> list[np.ndarray]:
    so = ort.SessionOptions()
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_integer_path_exact(out: Path, feeds: dict) -> tuple[int, np.ndarray, np.ndarray]:
    """Each layer fed the same int8 codes in both models has the same int32 accumulator (``<layer>.int_out``).

    The float ops between layers run on two runtimes (onnx.reference, onnxruntime) and differ in the
    last float bit, which can move an activation across a rounding boundary: such codes may differ
    by 1 (rarely); a layer whose input codes differ is not compared. Returns how many layers were
    compared exactly and the first model output of the deploy and the fake-quant model.
    """
    stem = out.name[: -len(".onnx")]
    deploy_model = onnx.load(out)
    fake_model = onnx.load(out.with_name(f"{stem}.fake_quant.onnx"))
    d_nodes = {n.name: n for n in deploy_model.graph.node}
    f_nodes = {n.name: n for n in fake_model.graph.node}
    producers = {o: n for n in deploy_model.graph.node for o in n.output}
    layers = [n.name[: -len(".dequant")] for n in deploy_model.graph.node if n.op_type == "AscendDequant"]
    wanted = [t for layer in layers for t in (f_nodes[layer].input[0], f"{layer}.int_out")]
    final = fake_model.graph.output[0].name
    fake_model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(wanted))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(fake_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fake = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    deploy = deploy_session(str(out)).run(None, feeds, intermediate=True)
    exact, flipped, codes = 0, 0, 0
    for layer in layers:
        quant = producers[d_nodes[layer].input[0]]
        offset = next(a.f for a in quant.attribute if a.name == "offset")
        d_codes = deploy[quant.output[0]].astype(np.float64) - offset
        f_codes = fake[f_nodes[layer].input[0]].astype(np.float64)
        assert np.abs(d_codes - f_codes).max() <= 1, layer
        flipped += int(np.count_nonzero(d_codes != f_codes))
        codes += d_codes.size
        if np.array_equal(d_codes, f_codes):
            assert deploy[f"{layer}.int_out"].dtype == np.int32
            np.testing.assert_array_equal(deploy[f"{layer}.int_out"], fake[f"{layer}.int_out"], err_msg=layer)
            exact += 1
    assert flipped <= 1e-3 * codes, (flipped, codes)
    return exact, deploy[final], fake[final]


def _check_run(out: Path) -> onnx.ModelProto:
    deploy = onnx.load(out)
    assert 8 <= deploy.opset_import[0].version <= 22 and len(deploy.opset_import) == 1
    stem = out.name[: -len(".onnx")]
    assert record_mismatches(deploy, parse_record(out.with_name(f"{stem}.record.txt").read_text())) == []
    return deploy


@pytest.mark.slow
def test_ppocr_cls_deploy_equals_fake_quant_and_accuracy_equals_qdq(tmp_path: Path) -> None:
    model = real_model("ppocr_cls")
    out = tmp_path / "cls.onnx"
    report = onnxcomp.quantize(
        model, out, calibration=[make_inputs("ppocr_cls", 16, 0)], target="ascend", reports=False
    )
    assert report.result("quantize").stats["nodes"] >= 50
    deploy = _check_run(out)
    assert sum(n.op_type == "AscendDequant" for n in deploy.graph.node) == report.result("quantize").stats["nodes"]
    feeds = make_inputs("ppocr_cls", 4, 1)
    count, deploy_y, fake_y = _assert_integer_path_exact(out, feeds)
    assert count >= report.result("quantize").stats["nodes"] - 2
    np.testing.assert_allclose(deploy_y, fake_y, rtol=0, atol=1e-6)  # after the final Softmax: float rounding
    # task metric: 0/180 accuracy of the fake-quant model vs the onnxruntime QDQ output, within noise
    held, meta = make_inputs("ppocr_cls", 64, 5, return_meta=True)
    qdq = tmp_path / "qdq.onnx"
    onnxcomp.quantize(model, qdq, calibration=[make_inputs("ppocr_cls", 16, 0)], reports=False)

    def accuracy(path: Path) -> float:
        return float((_fake_quant(path, held, optimized=True)[0].argmax(1) == meta["labels"]).mean())

    fake_acc, qdq_acc = accuracy(out.with_name("cls.fake_quant.onnx")), accuracy(qdq)
    assert abs(fake_acc - qdq_acc) <= 0.08, (fake_acc, qdq_acc)  # 64 samples: one sample is 0.016


@pytest.mark.slow
def test_ppocr_rec_deploy_equals_fake_quant(tmp_path: Path) -> None:
    out = tmp_path / "rec.onnx"
    calib = make_inputs("ppocr_rec", 8, 0, width=160)
    report = onnxcomp.quantize(real_model("ppocr_rec"), out, calibration=[calib], target="ascend", reports=False)
    step = report.result("quantize")
    assert step.stats.get("MatMul", 0) >= 4 and step.stats.get("Conv", 0) >= 50
    _check_run(out)
    feeds = make_inputs("ppocr_rec", 1, 1, width=160)
    count, deploy, fake = _assert_integer_path_exact(out, feeds)
    assert count >= step.stats["nodes"] - 4  # a code flipped by float rounding upstream: that layer not compared
    np.testing.assert_allclose(deploy, fake, rtol=0, atol=1e-3)  # a flipped code moves a probability slightly
    assert (deploy.argmax(-1) == fake.argmax(-1)).all()


#: ppocr_det's layers whose int32 bias does not fit (bias / deq up to 3.7e35): they stay float, as AMCT requires
DET_BIAS_OVERFLOW = {"Conv.45", "Conv.46", "Conv.50", "Conv.53"}


@pytest.mark.slow
def test_ppocr_det_deploy_matches_fake_quant_beyond_float32_exact_integers(tmp_path: Path) -> None:
    """int32 biases reach 1.6e8 here, past 2^24: the float32 fake-quant model rounds those sums, the deploy model not."""
    out = tmp_path / "det.onnx"
    calib = make_inputs("ppocr_det", 4, 0, height=160, width=160)
    report = onnxcomp.quantize(real_model("ppocr_det"), out, calibration=[calib], target="ascend", reports=False)
    step = report.result("quantize")
    overflow = {name for name, why in step.declined if why.startswith("int32 bias overflow")}
    assert overflow == DET_BIAS_OVERFLOW, step.declined
    assert step.stats["Conv"] >= 75 and step.stats["ConvTranspose"] == 2
    deploy_model = _check_run(out)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in deploy_model.graph.initializer}
    biases = [inits[n.input[2]] for n in deploy_model.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    assert max(int(np.abs(b).max()) for b in biases if b.dtype == np.int32) > 2**24  # the case this test is for
    feeds = make_inputs("ppocr_det", 1, 1, height=160, width=160)
    stem = "det"
    fake_model = onnx.load(out.with_name(f"{stem}.fake_quant.onnx"))
    layers = [n.name[: -len(".dequant")] for n in deploy_model.graph.node if n.op_type == "AscendDequant"]
    fake_model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(f"{layer}.int_out") for layer in layers)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(fake_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fake = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    deploy = deploy_session(str(out)).run(None, feeds, intermediate=True)
    exact = 0
    for layer in layers:  # accumulators: exact below 2^24, else within float32 rounding of the fake-quant sums
        d = deploy[f"{layer}.int_out"].astype(np.float64)
        f = fake[f"{layer}.int_out"].astype(np.float64)
        exact += bool(np.array_equal(d, f))
        assert np.all(np.abs(d - f) <= 2.0**-20 * np.maximum(np.abs(d), 2.0**24)), layer
    assert exact >= len(layers) - 10
    y_deploy, y_fake = deploy[deploy_model.graph.output[0].name], fake[fake_model.graph.output[0].name]
    np.testing.assert_allclose(y_deploy, y_fake, rtol=0, atol=1e-5)  # measured 1.3e-7 after the final Sigmoid
    assert ((y_deploy > 0.3) == (y_fake > 0.3)).mean() >= 0.9999  # the text map DBNet thresholds
