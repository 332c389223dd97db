"""Sharded calibration of Gram / sum statistics: GPTQ, SparseGPT, pruning, decomposition refit, bias correction.

These collectors write into accumulators the caller keeps (a ``Fanout``); workers fill empty copies
and the driver merges them into the caller's objects in batch order. Row sampling is seeded by the
batch's index, so a worker samples the rows one process would. The sums then differ from one
process only in the order of the float64 additions: the models are compared weight by weight with
rtol 1e-5 (on this machine they come out byte-identical; a summation-order difference could at
worst move a GPTQ / SparseGPT decision that sits on a tie).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import api, ir
from onnxcomp.calibration.collect import Calibrator
from onnxcomp.calibration.gram import Fanout, InputGram, batch_rows, design_rows, row_count
from onnxcomp.calibration.shard import CalibrationResources, calibration_resources
from onnxcomp.errors import CalibrationError
from onnxcomp.framework.base import Pass
from onnxcomp.framework.registry import make_pass

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_calib.npz"
TWO_WORKERS = CalibrationResources(workers=2)
SHARDED = "calibration sharded over 2 worker processes"


def fanout_model() -> onnx.ModelProto:
    """x[N, 3, 8, 8] -> Conv(6) -> Relu -> r1, read by a grouped Conv (group 2) and a 1x1 Conv."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((5, 6, 1, 1)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="grouped", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["r1", "w3"], ["c3"], name="pointwise"),
    ]
    graph = helper.make_graph(
        nodes,
        "fanout",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c2", "c3")],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def batches(n: int, size: int = 3) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    for i in range(n):
        yield {"x": (rng.standard_normal((size, 3, 8, 8)) * (1 + i % 3)).astype(np.float32)}


def kept_grams(graph: ir.Graph) -> dict[str, InputGram]:
    """The caller's accumulators, as SparseGPT keeps them: conv1 and grouped sample 50 rows a batch."""
    nodes = {n.name: n for n in graph.nodes}
    rows = {"conv1": 50, "grouped": 50, "pointwise": None}
    return {
        name: InputGram(nodes[name], max_rows=limit, rng=np.random.default_rng([7, i]))
        for i, (name, limit) in enumerate(rows.items())
    }


def fill(model: onnx.ModelProto, grams: dict[str, InputGram], data: list[dict[str, np.ndarray]]) -> None:
    factories = {
        "x": lambda: Fanout([grams["conv1"]]),
        "r1": lambda: Fanout([grams["grouped"], grams["pointwise"]]),
    }
    Calibrator(model, factories).run(data)


def test_workers_fill_the_callers_accumulators_with_the_same_rows() -> None:
    model = fanout_model()
    graph = ir.import_model(model)
    data = list(batches(11))  # 11 batches over 2 workers: chunks of 6 and 5 (the second seeks to batch 6)
    single = kept_grams(graph)
    fill(model, single, data)
    sharded = kept_grams(graph)
    with calibration_resources(TWO_WORKERS) as notes:
        fill(model, sharded, data)
    assert notes == [SHARDED]  # not "calibrated in this process: ... cannot merge partial results"
    for name, gram in single.items():
        other = sharded[name]  # the very objects the caller kept were filled
        assert other.rows == gram.rows > 0, name
        np.testing.assert_allclose(other.blocks(), gram.blocks(), rtol=1e-12, atol=1e-12, err_msg=name)
    assert single["conv1"].rows == 11 * 50 and single["pointwise"].rows == 11 * 3 * 64
    # brute force: batch i contributes the rows drawn with the seed (gram seed, i), wherever it ran
    conv1 = graph.nodes[0]
    reference = np.zeros((27, 27))
    for i, batch in enumerate(data):
        index = batch_rows(row_count(conv1, batch["x"].shape), 50, single["conv1"].seed, i)
        rows = design_rows(conv1, batch["x"], index)
        reference += rows.T @ rows
    np.testing.assert_allclose(sharded["conv1"].hessian(), reference / (11 * 50), rtol=1e-12, atol=1e-12)


def test_a_gram_travels_without_its_graph() -> None:
    graph = ir.import_model(fanout_model())
    gram = kept_grams(graph)["conv1"]
    copy = pickle.loads(pickle.dumps(gram.blank({})))
    assert copy.node is None and copy.layer == gram.layer and copy.seed == gram.seed
    assert len(pickle.dumps(gram.blank({}))) < 2_000  # geometry only: no weights, no graph


class Explodes:
    """A mergeable accumulator whose update fails on batch 4 (as a bad activation would)."""

    def __init__(self) -> None:
        self.batch = 0

    def update(self, x: np.ndarray) -> None:
        if self.batch == 4:
            raise CalibrationError("the design width changed between batches")
        self.batch += 1

    def seek(self, index: int) -> None:
        self.batch = index

    def blank(self, memo: dict[int, Any]) -> Explodes:
        return type(self)()

    def merge(self, other: Explodes) -> None:
        pass


class DiesInWorker(Explodes):
    def update(self, x: np.ndarray) -> None:
        os._exit(3)  # a worker killed by the OOM killer


def test_a_failing_accumulator_in_a_worker_is_a_one_line_error() -> None:
    kept = [Explodes()]
    with (
        calibration_resources(TWO_WORKERS),
        pytest.raises(CalibrationError, match=r"^calibration batch 4: tensor 'r1': the design width changed"),
    ):
        Calibrator(fanout_model(), {"r1": lambda: Fanout(kept)}).run(list(batches(6)))
    with calibration_resources(TWO_WORKERS), pytest.raises(CalibrationError, match="a calibration worker process died"):
        Calibrator(fanout_model(), {"r1": lambda: Fanout([DiesInWorker()])}).run(list(batches(4)))


# --- whole passes: one process vs two workers -----------------------------------------------------


def gptq_and_bias_correction(bias_correction: str = "full") -> list[Pass]:
    # 500 of the 4096 conv1 rows of a batch of 16: the row sampling is exercised; SmoothQuant's
    # ChannelStats (exact integer sums) are calibrated in a pass of their own first
    options = {"weight_algorithm": "gptq", "gram_rows": 500, "bias_correction": bias_correction, "smoothquant": 0.5}
    return [make_pass("fold_batchnorm"), make_pass("quantize", options)]


def pruning_and_sparsegpt() -> list[Pass]:
    # channel choice from data, then one-shot SparseGPT 2:4: both collect X^T X through a Fanout
    return [
        make_pass("fold_batchnorm"),
        make_pass("prune_channels", {"ratio": 0.25, "criterion": "data", "refit": False}),
        make_pass("sparsify_2to4", {"rows_per_batch": 500, "sequential": False}),
    ]


def decompositions() -> list[Pass]:
    # the least-squares refit of each second factor: normal equations over the first factor's output
    small = {"min_channels": 16, "align": 4, "min_kernel_channels": 4}
    return [make_pass("fold_batchnorm"), make_pass("decompose_conv", small), make_pass("decompose_matmul", small)]


def compress(out: Path, recipe: list[Pass], **resources: Any) -> tuple[onnx.ModelProto, list[str]]:
    report = api.compress(DIGITS, recipe, out, calibration=DIGITS_CALIB, batch_size=16, **resources)
    return onnx.load(str(out)), list(report.notes)


def assert_same_weights(single: onnx.ModelProto, sharded: onnx.ModelProto) -> None:
    """Same graph; float weights within rtol 1e-5; integer codes equal but for rare one-step ties."""
    assert [n.op_type for n in sharded.graph.node] == [n.op_type for n in single.graph.node]
    ours = {t.name: numpy_helper.to_array(t) for t in sharded.graph.initializer}
    assert sorted(ours) == sorted(t.name for t in single.graph.initializer)
    for tensor in single.graph.initializer:
        want, got = numpy_helper.to_array(tensor), ours[tensor.name]
        assert got.dtype == want.dtype and got.shape == want.shape, tensor.name
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=tensor.name)
        else:
            moved = got.astype(np.int64) - want.astype(np.int64)
            assert np.abs(moved).max(initial=0) <= 1 and np.count_nonzero(moved) <= max(1, want.size // 1000), (
                tensor.name
            )


@pytest.mark.parametrize("recipe", [gptq_and_bias_correction, pruning_and_sparsegpt, decompositions])
def test_passes_with_two_workers_match_one_process(tmp_path: Path, recipe: Any) -> None:
    source = DIGITS.read_bytes()
    single, single_notes = compress(tmp_path / "single.onnx", recipe())
    sharded, notes = compress(tmp_path / "sharded.onnx", recipe(), workers=2)
    assert_same_weights(single, sharded)
    assert SHARDED in notes and not [n for n in notes if "calibrated in this process" in n], notes
    assert not single_notes
    assert DIGITS.read_bytes() == source  # the input is never modified
    if recipe is decompositions:  # each probe's sums merged once (a probe reads two tensors): same rows
        refits = [
            {
                n["node"]: n["refit"]
                for n in json.loads((tmp_path / f"{name}.decomposition_record.json").read_text())["nodes"]
            }
            for name in ("single", "sharded")
        ]
        assert sorted(refits[0]) == ["conv2", "conv3", "conv4", "fc1"] and refits[1].keys() == refits[0].keys()
        for node, fit in refits[0].items():
            assert refits[1][node]["rows"] == fit["rows"] > 0, node
            assert refits[1][node]["error_refit"] == pytest.approx(fit["error_refit"], rel=1e-9), node


def test_ray_cluster_matches_one_process(tmp_path: Path, ray_cluster: Any) -> None:
    # bias correction "fast": one calibration (each one starts its Ray actors)
    single, _ = compress(tmp_path / "single.onnx", gptq_and_bias_correction("fast"))
    on_ray, notes = compress(tmp_path / "ray.onnx", gptq_and_bias_correction("fast"), ray="auto")
    assert_same_weights(single, on_ray)
    assert "calibration sharded over the Ray cluster at auto" in notes, notes
