"""SmoothQuant, AWQ and equalization through the quantize pass (API, CLI, recipe, record)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import ir
from onnxcomp.api import quantize
from onnxcomp.calibration.channels import ChannelStats
from onnxcomp.calibration.collect import Calibrator
from onnxcomp.cli.main import main
from onnxcomp.errors import OnnxCompError
from onnxcomp.quant.migration import smooth_targets
from onnxcomp.quant.smooth import smoothquant
from onnxcomp.testing import run_model


def _outlier_mlp(seed: int = 0) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """LayerNorm -> MatMul -> Relu -> MatMul whose LayerNorm gains make 4 of 32 channels 40x larger."""
    rng = np.random.default_rng(seed)
    gain = np.where(np.arange(32) % 8 == 0, 40.0, 1.0).astype(np.float32)
    inits = [
        numpy_helper.from_array(gain, "g"),
        numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.2, (32, 48)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (48, 16)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], "ln", axis=-1),
        helper.make_node("MatMul", ["h", "w1"], ["m"], "fc1"),
        helper.make_node("Relu", ["m"], ["r"], "relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], "fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def batches(s: int, n: int) -> list[dict[str, np.ndarray]]:
        r = np.random.default_rng(s)
        return [{"x": r.normal(0, 1, (4, 8, 32)).astype(np.float32)} for _ in range(n)]

    return model, batches(1, 4), batches(2, 2)


def _error(model: onnx.ModelProto, quantized: onnx.ModelProto, data: list[dict[str, np.ndarray]]) -> float:
    return sum(float(np.sum((run_model(quantized, b)[0] - run_model(model, b)[0]) ** 2)) for b in data)


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smoothquant_lowers_w8a8_error_and_is_recorded(alpha: float | str) -> None:
    model, calib, held = _outlier_mlp()
    plain = quantize(model, calibration=calib, fuse=False, reports=False)
    smooth = quantize(model, calibration=calib, fuse=False, reports=False, smoothquant=alpha)
    onnx.checker.check_model(smooth.model)
    assert _error(model, smooth.model, held) < 0.7 * _error(model, plain.model, held)
    entry = {e["node"]: e for e in smooth.result("quantize").data["record"]}["fc1"]
    sq = entry["algorithms"]["smoothquant"]
    assert sq["fold"]["kind"] == "LayerNormalization" and sq["s_max"] > sq["s_min"]
    assert (sq["alpha"] == 0.5) if alpha == 0.5 else (0.0 <= sq["alpha"] <= 1.0 and "loss" in sq)


def test_smoothquant_alone_keeps_the_float_model_exact() -> None:
    """With weights and activations left in float, SmoothQuant alone must not change the outputs."""
    model, calib, held = _outlier_mlp(3)
    report = quantize(model, calibration=calib, fuse=False, reports=False, smoothquant=0.7)
    assert report.result("quantize").stats["smoothquant"] == 2  # fc1 (into the LayerNorm) and fc2 (a Mul)
    graph = ir.import_model(model)
    nodes = [n for n in graph.nodes if n.op == "MatMul"]
    factories = {t.tensor: (lambda a=t.axis: ChannelStats(a)) for t in smooth_targets(graph, nodes)}
    stats = Calibrator(model, factories).run(calib)
    smoothquant(graph, nodes, stats, 0.7)
    ir.finalize(graph)
    rewritten = ir.export_model(graph, model)
    for b in held:
        np.testing.assert_allclose(run_model(rewritten, b)[0], run_model(model, b)[0], rtol=1e-4, atol=1e-4)


def test_awq_int4_weight_only_beats_round_to_nearest() -> None:
    model, calib, held = _outlier_mlp(4)
    kw = {"weights": "int4", "granularity": "group:32", "activations": "none", "fuse": False, "reports": False}
    rtn = quantize(model, calibration=calib, **kw)
    awq = quantize(model, calibration=calib, weight_algorithm="awq", **kw)
    assert _error(model, awq.model, held) <= _error(model, rtn.model, held)
    entry = {e["node"]: e for e in awq.result("quantize").data["record"]}["fc1"]
    assert entry["algorithms"]["awq"]["loss_after"] <= entry["algorithms"]["awq"]["loss_before"]


def test_equalize_through_the_pass_is_recorded_and_lowers_w8_error() -> None:
    rng = np.random.default_rng(5)
    gains = np.exp(rng.uniform(np.log(0.01), np.log(10.0), 16)).astype(np.float32)
    inits = [
        numpy_helper.from_array(
            (rng.normal(0, 1, (16, 3, 3, 3)) * gains[:, None, None, None]).astype(np.float32), "w1"
        ),
        numpy_helper.from_array((rng.normal(0, 1, 16) * gains).astype(np.float32), "b1"),
        numpy_helper.from_array(
            (rng.normal(0, 1, (32, 16, 3, 3)) / gains[None, :, None, None]).astype(np.float32), "w2"
        ),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], "conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"x": rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    kw = {"fuse": False, "reports": False, "granularity": "tensor", "placement": "all"}
    plain = quantize(model, calibration=calib, **kw)
    eq = quantize(model, calibration=calib, equalize=True, **kw)
    entry = {e["node"]: e for e in eq.result("quantize").data["record"]}["conv1"]
    assert entry["algorithms"]["equalize"]["w1_spread_after"] < entry["algorithms"]["equalize"]["w1_spread_before"]
    assert _error(model, eq.model, calib) < 0.5 * _error(model, plain.model, calib)


def test_smoothquant_needs_calibration_data() -> None:
    model, _, _ = _outlier_mlp()
    with pytest.raises(OnnxCompError, match="need calibration data"):
        quantize(model, activations="none", weights="int4", weight_algorithm="awq", fuse=False)


def test_cli_flags_reach_the_pass(tmp_path: Path) -> None:
    model, calib, _ = _outlier_mlp()
    src, data, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    onnx.save(model, src)
    np.savez(data, x=np.concatenate([b["x"] for b in calib]))
    code = main(
        ["quantize", str(src), "-o", str(out), "--calib", str(data), "--smoothquant", "auto", "--bias-correction", "-q"]
    )
    assert code == 0 and out.exists()
    with pytest.raises(SystemExit):
        main(["quantize", str(src), "-o", str(out), "--calib", str(data), "--smoothquant", "1.5"])
