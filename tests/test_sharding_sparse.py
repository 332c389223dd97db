"""Sharded dense-target SparseGPT (``sparsify_2to4``'s default): one process vs workers vs Ray.

Each layer's statistics come from one model computing the sparse model's layer input and the dense
model's layer output (``sparsity.dense_collect.pair_model``); workers run it on their chunks of
batches and return the layer's input and output of each batch, which the driver feeds to the
layer's ``DenseTargetStats`` in batch order. So the statistics (row sampling, float sums) are the
one-process ones: weights are compared with rtol 1e-5 and masks exactly (in this design a
difference could only come from onnxruntime summing in another order with fewer threads).
Channel pruning's consumer refit (``RefitAccumulator``) goes through the same pairs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import api, ir
from onnxcomp.calibration.shard import CalibrationResources, calibration_resources
from onnxcomp.errors import CalibrationError
from onnxcomp.framework.registry import make_pass
from onnxcomp.runtime import ort_session
from onnxcomp.sparsity.dense_collect import collect_dense_target, pair_model
from onnxcomp.sparsity.dense_target import DenseTargetStats

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_calib.npz"
SHARDED = "calibration sharded over 2 worker processes"


def matmul_model() -> onnx.ModelProto:
    """x[N, 16] -> MatMul(16x32) -> Relu -> Gemm(32->24, bias) -> Relu -> MatMul(24x8) -> y."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((24, 32)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.standard_normal((24, 8)).astype(np.float32) * 0.3, "w3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Relu", ["m1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["g2"], name="gemm2", transB=1),
        helper.make_node("Relu", ["g2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def data(n: int = 6, size: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": (rng.standard_normal((size, 16)) * (1 + i % 3)).astype(np.float32)} for i in range(n)]


def sparsify(
    model: Path, calibration: Path, out: Path, batch_size: int, **resources: Any
) -> tuple[onnx.ModelProto, list[str]]:
    # the default: sequential SparseGPT fitted to the dense target; 40 rows a batch exercises the sampling
    recipe = [make_pass("fold_batchnorm"), make_pass("sparsify_2to4", {"rows_per_batch": 40})]
    report = api.compress(model, recipe, out, calibration=calibration, batch_size=batch_size, **resources)
    return onnx.load(str(out)), list(report.notes)


def assert_same_sparse_weights(single: onnx.ModelProto, sharded: onnx.ModelProto) -> None:
    """Same graph and masks; float weights within rtol 1e-5."""
    assert [n.op_type for n in sharded.graph.node] == [n.op_type for n in single.graph.node]
    ours = {t.name: numpy_helper.to_array(t) for t in sharded.graph.initializer}
    assert sorted(ours) == sorted(t.name for t in single.graph.initializer)
    for tensor in single.graph.initializer:
        want, got = numpy_helper.to_array(tensor), ours[tensor.name]
        assert got.shape == want.shape and got.dtype == want.dtype, tensor.name
        np.testing.assert_array_equal(got != 0, want != 0, err_msg=tensor.name)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=tensor.name)


def dense_target_layers(path: Path) -> dict[str, str]:
    record = json.loads(path.with_name(path.stem + ".sparsity_record.json").read_text())
    return {e["node"]: e["method"] for e in record["layers"] if e.get("target") == "dense"}


def test_digits_dense_target_with_two_workers_matches_one_process(tmp_path: Path) -> None:
    source = DIGITS.read_bytes()
    single, single_notes = sparsify(DIGITS, DIGITS_CALIB, tmp_path / "single.onnx", 16)
    sharded, notes = sparsify(DIGITS, DIGITS_CALIB, tmp_path / "sharded.onnx", 16, workers=2)
    assert_same_sparse_weights(single, sharded)
    assert SHARDED in notes and not [n for n in notes if "in this process" in n], notes
    assert not single_notes
    fitted = dense_target_layers(tmp_path / "single.onnx")
    assert len(fitted) >= 4 and dense_target_layers(tmp_path / "sharded.onnx") == fitted
    assert DIGITS.read_bytes() == source  # the input is never modified


def test_matmul_model_with_two_workers_matches_one_process(tmp_path: Path) -> None:
    model_path, calib = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(matmul_model(), str(model_path))
    np.savez(calib, x=np.concatenate([b["x"] for b in data(8)]))
    single, _ = sparsify(model_path, calib, tmp_path / "single.onnx", 8)
    sharded, notes = sparsify(model_path, calib, tmp_path / "sharded.onnx", 8, workers=2)
    assert_same_sparse_weights(single, sharded)
    assert SHARDED in notes, notes
    assert sorted(dense_target_layers(tmp_path / "single.onnx")) == ["gemm2", "mm1", "mm3"]


def test_channel_pruning_refit_with_two_workers_matches_one_process(tmp_path: Path) -> None:
    # criterion "data" (X^T X, sharded since 7bb257a) and the consumers' refit (the pairs, sharded here)
    recipe = [
        make_pass("fold_batchnorm"),
        make_pass("prune_channels", {"ratio": 0.25, "criterion": "data", "rows_per_batch": 200}),
    ]
    reports = {}
    for name, resources in (("single", {}), ("sharded", {"workers": 2})):
        out = tmp_path / f"{name}.onnx"
        reports[name] = api.compress(DIGITS, recipe, out, calibration=DIGITS_CALIB, batch_size=16, **resources)
    single, sharded = onnx.load(str(tmp_path / "single.onnx")), onnx.load(str(tmp_path / "sharded.onnx"))
    assert_same_sparse_weights(single, sharded)
    assert SHARDED in reports["sharded"].notes and not [n for n in reports["sharded"].notes if "in this process" in n]
    refits = [reports[name].result("prune_channels").data for name in ("single", "sharded")]
    assert refits[0] == refits[1]


def brute_force(model: onnx.ModelProto, node: ir.Node, batches: list[dict[str, np.ndarray]]) -> DenseTargetStats:
    """The statistics from two plain sessions, batch by batch (what the pass did before pairing)."""
    stats = DenseTargetStats(node, 5, np.random.default_rng(11))
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    session = ort_session(model, level="disable", expose=[x_name, y_name])
    for batch in batches:
        x, y = session.run([x_name, y_name], batch)
        stats.update(x, y)
    return stats


def test_pair_model_stats_equal_two_sessions_and_merge_once() -> None:
    model = matmul_model()
    graph = ir.import_model(model)
    node = next(n for n in graph.nodes if n.name == "gemm2")
    pair, renamed = pair_model(model, model, ["r1"], ["g2"])
    y_pair = renamed["g2"]
    assert y_pair != "g2" and [o.name for o in pair.graph.output] == [y_pair]
    want = brute_force(model, node, data())
    for resources in (CalibrationResources(), CalibrationResources(workers=2)):
        stats = DenseTargetStats(node, 5, np.random.default_rng(11))
        with calibration_resources(resources) as notes:
            collect_dense_target(model, model, "r1", "g2", stats, data())
        assert stats.rows == want.rows == 6 * 5  # merged once, not once per slot
        assert stats.h is not None and stats.c is not None and want.h is not None and want.c is not None
        np.testing.assert_allclose(stats.h, want.h, rtol=1e-12)
        np.testing.assert_allclose(stats.c, want.c, rtol=1e-12)
        assert stats.yy == pytest.approx(want.yy, rel=1e-12)
        assert (SHARDED in notes) == resources.sharded


def test_what_travels_to_a_worker_carries_no_graph() -> None:
    # the statistics (which hold the layer's node, linking the graph) stay in the driver
    from onnxcomp.sparsity.dense_collect import _Pair, _Slot

    graph = ir.import_model(matmul_model())
    stats = DenseTargetStats(next(n for n in graph.nodes if n.name == "mm1"), 5, np.random.default_rng(1))
    slot = _Slot([_Pair(stats, "mm1")], "x")
    assert len(pickle.dumps(slot)) < 1000 and pickle.loads(pickle.dumps(slot)).pairs[0].stats is None
    copy = slot.blank({})
    copy.update(np.ones((2, 16), np.float32))
    assert copy.pairs[0].stats is None and stats.rows == 0  # a worker's copy records; it never touches the driver's


def test_a_bad_batch_in_a_worker_is_a_one_line_error() -> None:
    model = matmul_model()
    node = next(n for n in ir.import_model(model).nodes if n.name == "mm3")
    batches = data()
    batches[3] = {"z": batches[3]["x"]}
    stats = DenseTargetStats(node, None, np.random.default_rng(0))
    with calibration_resources(CalibrationResources(workers=2)), pytest.raises(CalibrationError) as info:
        collect_dense_target(model, model, "r2", "y", stats, batches)
    assert "calibration batch 3: missing model input(s) x" in str(info.value)
    assert "\n" not in str(info.value)


def test_ray_cluster_matches_one_process(tmp_path: Path, ray_cluster: Any) -> None:
    model_path, calib = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(matmul_model(), str(model_path))
    np.savez(calib, x=np.concatenate([b["x"] for b in data(8)]))
    single, _ = sparsify(model_path, calib, tmp_path / "single.onnx", 8)
    on_ray, notes = sparsify(model_path, calib, tmp_path / "ray.onnx", 8, ray="auto")
    assert_same_sparse_weights(single, on_ray)
    assert "calibration sharded over the Ray cluster at auto" in notes, notes
