"""The report's local SQNR: each quantized node fed the float input, checked by a direct computation."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.api import quantize
from onnxcomp.quant.report import format_report, skip_suggestions
from onnxcomp.runtime import with_outputs
from onnxcomp.testing import run_model


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (32, 8)).astype(np.float32)
    w2[:, 0] *= 50  # one badly conditioned output column: a larger per-channel step elsewhere
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["m1"], "fc1"),
            helper.make_node("Relu", ["m1"], ["r"], "relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], "fc2"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    r, d = ref.astype(np.float64), (ref - test).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum(d * d)))


def test_local_sqnr_of_second_layer_matches_direct_computation() -> None:
    model = _mlp()
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(0, 1, (4, 8, 16)).astype(np.float32)} for _ in range(4)]
    report = quantize(model, calibration=batches, fuse=False)
    data = report.result("quantize").data
    rows = {r["node"]: r for r in data["report"]["nodes"]}
    entry = {e["node"]: e for e in data["record"]}["fc2"]
    act = entry["activations"][0]
    scale, zp = act["scale"], act["zero_point"]
    inits = {t.name: numpy_helper.to_array(t) for t in report.model.graph.initializer}
    codes = next(v for k, v in inits.items() if k.startswith("w2") and v.dtype == np.int8)
    w_scale = np.asarray(entry["weights"]["scale"], np.float32)
    w_deq = codes.astype(np.float32) * w_scale[None, :]
    refs, tests = [], []
    for b in batches:
        r, y = run_model(with_outputs(model, ["r"]), b)[1], run_model(model, b)[0]
        q = np.clip(np.rint(r / np.float32(scale)) + zp, 0, 255)
        x_deq = ((q - zp) * np.float32(scale)).astype(np.float32)
        refs.append(y)
        tests.append(x_deq @ w_deq)
    direct = _sqnr(np.concatenate(refs), np.concatenate(tests))
    assert abs(rows["fc2"]["local_sqnr_db"] - direct) < 0.05, (rows["fc2"], direct)
    # fc1 reads the graph input: its local and cumulative figures are the same
    assert abs(rows["fc1"]["local_sqnr_db"] - rows["fc1"]["sqnr_db"]) < 1e-6
    assert "local" in format_report(data["report"])


def test_skip_suggestions_name_the_outlier() -> None:
    report = {
        "batches": 1,
        "outputs": [],
        "nodes": [
            {"node": f"n{i}", "op": "Conv", "sqnr_db": 30.0, "cosine": 1.0, "local_sqnr_db": 40.0} for i in range(5)
        ]
        + [{"node": "bad", "op": "MatMul", "sqnr_db": 12.0, "cosine": 0.9, "local_sqnr_db": 14.0}],
    }
    assert skip_suggestions(report) == ["bad"]
    assert "--skip 'bad'" in format_report(report)
