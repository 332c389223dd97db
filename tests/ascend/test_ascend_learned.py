"""--target ascend with GPTQ, bias correction and layer-wise distillation (the demo CNN).

Each run: the deploy model on the reference interpreter equals the fake-quant model on
onnxruntime bit for bit, the record reproduces the deploy model, and the result is at least as
accurate as round-to-nearest (held-out top-1, and a lower logit error against the float model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp.quant.ascend.consistency import record_mismatches
from onnxcomp.quant.ascend.record import parse_record
from onnxcomp.quant.ascend.reference import run_deploy

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO, CALIB, HELDOUT = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz", MODELS / "digits_heldout.npz"


def _run_fake(path: Path, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the float32 path is the integer path
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _check(out: Path) -> dict:
    """Deploy == fake-quant bit for bit, record == deploy; returns the logits, accuracy, error and records."""
    held = np.load(HELDOUT)
    x, labels = held["input"], held["label"]
    stem = out.name[: -len(".onnx")]
    fake = _run_fake(out.with_name(f"{stem}.fake_quant.onnx"), {"input": x})
    np.testing.assert_array_equal(run_deploy(str(out), {"input": x})[0], fake)
    record = parse_record(out.with_name(f"{stem}.record.txt").read_text())
    assert record_mismatches(onnx.load(out), record) == []
    reference = ort.InferenceSession(str(DEMO), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return {
        "logits": fake,
        "accuracy": float((fake.argmax(1) == labels).mean()),
        "mse": float(((fake.astype(np.float64) - reference) ** 2).mean()),
        "record": record,
        "json": {e["node"]: e for e in json.loads(out.with_name(f"{stem}.quant_record.json").read_text())},
        "deploy": onnx.load(out),
    }


@pytest.fixture(scope="module")
def rtn(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("rtn") / "rtn.onnx"
    onnxcomp.quantize(DEMO, out, calibration=CALIB, target="ascend", reports=False)
    return _check(out)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _layer_inputs(model: onnx.ModelProto, layer: str) -> list[np.ndarray]:
    inits = _inits(model)
    node = next(n for n in model.graph.node if n.name == layer)
    return [inits[name] for name in node.input[1:] if name in inits]


def test_gptq_keeps_the_grid_changes_codes_and_is_at_least_as_accurate(rtn: dict, tmp_path: Path) -> None:
    out = tmp_path / "gptq.onnx"
    report = onnxcomp.quantize(DEMO, out, calibration=CALIB, target="ascend", weight_algorithm="gptq", reports=False)
    assert report.result("quantize").stats["gptq"] == 6
    got = _check(out)
    changed = 0
    for layer, value in got["record"].items():  # GPTQ picks other codes on the round-to-nearest grid
        assert list(value.scale_w) == list(rtn["record"][layer].scale_w), layer
        assert value.scale_d == rtn["record"][layer].scale_d
        assert got["json"][layer]["weights"]["name"] == "gptq"
        changed += not np.array_equal(_layer_inputs(got["deploy"], layer)[0], _layer_inputs(rtn["deploy"], layer)[0])
    assert changed == 6
    assert got["accuracy"] >= rtn["accuracy"]
    assert got["mse"] < 0.75 * rtn["mse"]  # measured 1.45e-4 vs 3.05e-4


@pytest.mark.parametrize(("variant", "ratio"), [("full", 0.85), ("fast", 0.95)])
def test_bias_correction_moves_the_mean_error_into_the_int32_bias(
    rtn: dict, tmp_path: Path, variant: str, ratio: float
) -> None:
    out = tmp_path / f"bc_{variant}.onnx"
    report = onnxcomp.quantize(DEMO, out, calibration=CALIB, target="ascend", bias_correction=variant, reports=False)
    assert report.result("quantize").stats["bias_corrected"] == 6
    got = _check(out)
    for layer, value in got["record"].items():
        assert list(value.scale_w) == list(rtn["record"][layer].scale_w)  # only the bias changes
        weight, bias = _layer_inputs(got["deploy"], layer)
        rtn_weight, rtn_bias = _layer_inputs(rtn["deploy"], layer)
        np.testing.assert_array_equal(weight, rtn_weight)
        assert bias.dtype == np.int32 and not np.array_equal(bias, rtn_bias), layer
        entry = got["json"][layer]["bias_correction"]
        assert entry["variant"] == variant and entry["site"] == "int32 bias"
    assert got["accuracy"] >= rtn["accuracy"]
    assert got["mse"] < ratio * rtn["mse"]  # measured full 2.30e-4, fast 2.73e-4 vs 3.05e-4


def test_distill_learns_on_the_ascend_grid(rtn: dict, tmp_path: Path) -> None:
    out = tmp_path / "distill.onnx"
    report = onnxcomp.distill(DEMO, out, calibration=CALIB, target="ascend", iters=40, reports=False)
    got = _check(out)
    distilled = [layer for layer, entry in got["json"].items() if entry["distill"]["kept"] == "distilled"]
    assert report.result("distill").stats["distilled"] == len(distilled) >= 4  # measured: 6 of 6
    for layer, entry in got["json"].items():
        if layer in distilled:
            assert entry["distill"]["error_after"] < entry["distill"]["error_before"]
        assert len(got["record"][layer].scale_w) == len(rtn["record"][layer].scale_w)  # the same granularity
    assert got["accuracy"] >= rtn["accuracy"]
    assert got["mse"] < 0.85 * rtn["mse"]


def _biasless_model(path: Path) -> Path:
    """Conv without a bias -> Relu -> Flatten -> MatMul: bias correction creates the Conv's int32 bias."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.4, (4, 2, 3, 3)).astype(np.float32)
    m = rng.normal(0, 0.3, (64, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "m"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "biasless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(m, "m")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_bias_correction_creates_an_int32_bias_and_leaves_a_matmul_as_it_is(tmp_path: Path) -> None:
    model = _biasless_model(tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(0.3, 1.0, (64, 2, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "bc.onnx"
    onnxcomp.quantize(model, out, calibration=tmp_path / "calib.npz", target="ascend", bias_correction="full")
    deploy = onnx.load(out)
    conv = next(n for n in deploy.graph.node if n.name == "conv")
    assert len(conv.input) == 3 and _inits(deploy)[conv.input[2]].dtype == np.int32
    fake = _run_fake(tmp_path / "bc.fake_quant.onnx", {"x": x})
    np.testing.assert_array_equal(run_deploy(str(out), {"x": x})[0], fake)
    assert record_mismatches(deploy, parse_record((tmp_path / "bc.record.txt").read_text())) == []
    entries = {e["node"]: e for e in json.loads((tmp_path / "bc.quant_record.json").read_text())}
    assert entries["conv"]["bias_correction"]["site"] == "new int32 bias"
    assert entries["fc"]["bias_correction"] == {
        "skipped": "a MatMul without a bias Add has no bias in the Ascend deploy form"
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_accuracy_target_searches_ascend_candidates(tmp_path: Path) -> None:
    x = np.load(HELDOUT)["input"]
    reference = ort.InferenceSession(str(DEMO), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    int4 = {"weights": "int4", "ascend_int4": True, "calibration": CALIB, "target": "ascend", "reports": False}
    plain = tmp_path / "w4.onnx"
    onnxcomp.quantize(DEMO, plain, **int4)
    out = tmp_path / "searched.onnx"
    report = onnxcomp.quantize(DEMO, out, accuracy_target="cos:0.9996", **int4)
    search = report.result("quantize").data["search"]
    assert search["met"] and search["score"] >= 0.9996 and 0 < len(search["fallback"]) < 5
    got = _check(out)
    for layer, value in got["record"].items():  # raised layers are INT8 in the deploy model, the others INT4
        assert value.wts_type == ("INT8" if layer in search["fallback"] else "INT4"), layer
    before = _cosine(_run_fake(tmp_path / "w4.fake_quant.onnx", {"input": x}), reference)
    assert _cosine(got["logits"], reference) > before
    assert (tmp_path / "searched.quant_config.toml").is_file()


def test_sensitivity_ranks_every_ascend_layer(rtn: dict, tmp_path: Path) -> None:
    out = tmp_path / "sens.onnx"
    report = onnxcomp.quantize(DEMO, out, calibration=CALIB, target="ascend", sensitivity=True)
    rows = report.result("quantize").data["sensitivity"]["nodes"]
    assert sorted(r["node"] for r in rows) == sorted(rtn["record"])
    assert all(0.99 < r["only_quantized"] <= 1.0 and 0.99 < r["only_float"] <= 1.0 for r in rows)
    got = _check(out)  # the sensitivity run writes the plain quantization
    np.testing.assert_array_equal(got["logits"], rtn["logits"])


def test_distilled_activation_ranges_reach_the_ascend_quant_factors(rtn: dict, tmp_path: Path) -> None:
    out = tmp_path / "ranges.onnx"
    learn = onnxcomp.framework.make_pass("distill", {"target": "ascend", "iters": 60, "learn_ranges": True})
    onnxcomp.compress(onnxcomp.fuse(DEMO).model, [learn], out, calibration=CALIB)
    got = _check(out)  # AscendQuant scale / offset from the learned ranges in both models and the record
    moved = [e["node"] for e in got["json"].values() if "input_range" in e["distill"]]
    assert moved, "no input range was learned"
    for layer in moved:
        assert got["record"][layer].scale_d != rtn["record"][layer].scale_d
