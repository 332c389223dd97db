"""A round trip that keeps the model: IR 3 exports, overridable initializers, non-tensor outputs,
stale declared shapes, and no growth when nothing changed.

Each model goes through inspect, fuse, weight-only quantize and 2:4 sparsify; outputs are run in
onnxruntime at ORT_DISABLE_ALL and ORT_ENABLE_ALL against the original.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import onnxcomp
from onnxcomp import ir
from onnxcomp.analysis.inspect import summarize
from onnxcomp.model_io import load_model, repair_declared_shapes

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
X = np.random.default_rng(7).standard_normal((2, 8)).astype(np.float32)


def run(model: onnx.ModelProto, feeds: dict, level: str) -> list:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def mlp(ir_version: int, opset: int, initializers_as_inputs: bool) -> onnx.ModelProto:
    """``y = x @ w1 + b1`` (x: 2x8, w1: 8x16)."""
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])]
    if initializers_as_inputs:
        inputs += [
            oh.make_tensor_value_info("w1", TensorProto.FLOAT, [8, 16]),
            oh.make_tensor_value_info("b1", TensorProto.FLOAT, [16]),
        ]
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["mm"], name="mm"),
        oh.make_node("Add", ["mm", "b1"], ["y"], name="add"),
    ]
    graph = oh.make_graph(
        nodes,
        "mlp",
        inputs,
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        initializer=[nh.from_array(w, "w1"), nh.from_array(b, "b1")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=ir_version)


def zipmap_model() -> onnx.ModelProto:
    """A classifier whose second output is ZipMap's sequence of maps (a non-tensor type)."""
    w = np.random.default_rng(2).standard_normal((8, 3)).astype(np.float32)
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["logits"], name="mm"),
        oh.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
        oh.make_node("ZipMap", ["probs"], ["zm"], name="zipmap", domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
    ]
    seq_map = oh.make_sequence_type_proto(
        oh.make_map_type_proto(TensorProto.INT64, oh.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    graph = oh.make_graph(
        nodes,
        "zip",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
        [oh.make_tensor_value_info("probs", TensorProto.FLOAT, ["B", 3]), oh.make_value_info("zm", seq_map)],
        initializer=[nh.from_array(w, "w")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", 3)], ir_version=8)


def wrong_shape_model() -> onnx.ModelProto:
    """The output is declared (2, 5) but the graph computes (2, 16); a stale value_info says (2, 7)."""
    model = mlp(8, 11, initializers_as_inputs=False)
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    model.graph.value_info.append(oh.make_tensor_value_info("mm", TensorProto.FLOAT, [2, 7]))
    return model


def _commands(src, tmp_path):
    """(name, output model) of fuse, weight-only int8 quantize and 2:4 sparsify on ``src``."""
    onnxcomp.fuse(src, tmp_path / "fused.onnx")
    onnxcomp.quantize(src, tmp_path / "q.onnx", weights="int8", activations="none")
    onnxcomp.sparsify(src, tmp_path / "s.onnx", pattern="2:4")
    return [(name, onnx.load(tmp_path / f"{name}.onnx")) for name in ("fused", "q", "s")]


def _close(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if name == "fused":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    elif name == "q":
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    else:  # 2:4 zeroes half the weights: the output moves, but stays correlated
        assert float(np.corrcoef(got.ravel(), want.ravel())[0, 1]) > 0.5


@pytest.mark.parametrize("opset", [8, 9])
def test_ir3_model_initializers_listed_as_inputs(tmp_path, opset):
    model = mlp(3, opset, initializers_as_inputs=True)
    src = tmp_path / "ir3.onnx"
    onnx.save(model, src)
    assert summarize(load_model(src)).param_count == 8 * 16 + 16
    assert [t.name for t in summarize(model).inputs] == ["x"]
    for name, out in _commands(src, tmp_path):
        onnx.checker.check_model(out, full_check=True)
        if out.ir_version < 4:  # still IR 3: every initializer is listed as an input again
            assert {t.name for t in out.graph.initializer} <= {v.name for v in out.graph.input}
        for level in LEVELS:
            _close(name, run(out, {"x": X}, level)[0], run(model, {"x": X}, level)[0])


def test_overridable_initializers_stay_graph_inputs(tmp_path):
    model = mlp(8, 17, initializers_as_inputs=True)
    src = tmp_path / "over.onnx"
    onnx.save(model, src)
    graph = ir.import_model(model)
    assert [t.name for t in graph.inputs] == ["x", "w1", "b1"]  # a default the caller may replace: not folded
    assert not ir.is_constant(graph.inputs[1])
    w2 = np.full((8, 16), 0.5, np.float32)
    for name, out in _commands(src, tmp_path):
        assert [v.name for v in out.graph.input] == ["x", "w1", "b1"]
        assert {t.name for t in out.graph.initializer} >= {"w1", "b1"}
        assert out.SerializeToString() == model.SerializeToString(), name  # nothing to do: the input itself
        for level in LEVELS:  # the override still works
            got = run(out, {"x": X, "w1": w2}, level)[0]
            np.testing.assert_allclose(got, X @ w2 + nh.to_array(model.graph.initializer[1]), rtol=1e-5)


def test_zipmap_output_keeps_its_type(tmp_path):
    model = zipmap_model()
    src = tmp_path / "zip.onnx"
    onnx.save(model, src)
    assert summarize(model).ops["ai.onnx.ml::ZipMap"] == 1
    x = X[:, :8]
    for name, out in _commands(src, tmp_path):
        assert out.graph.output[1].type == model.graph.output[1].type
        for level in LEVELS:
            got, want = run(out, {"x": x}, level), run(model, {"x": x}, level)
            assert isinstance(got[1], list) and sorted(got[1][0]) == [0, 1, 2]
            if name != "s":
                np.testing.assert_allclose(got[0], want[0], atol=0.02)


def test_export_restores_non_tensor_types_after_a_rewrite():
    model = zipmap_model()
    graph = ir.import_model(model)
    ir.finalize(graph)
    out = ir.export_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.output[1].type.WhichOneof("value") == "sequence_type"
    assert out.graph.output[1].type == model.graph.output[1].type


def test_stale_declared_shapes_are_repaired_and_said(tmp_path, caplog):
    model = wrong_shape_model()
    repaired, notes = repair_declared_shapes(model)
    assert len(notes) == 2
    assert notes[0].startswith("output 'y' is declared with shape [2, 5] but the graph computes [2, 16]")
    assert notes[1].startswith("value_info of 'mm' says shape [2, 7]")
    assert [d.dim_value for d in repaired.graph.output[0].type.tensor_type.shape.dim] == [2, 16]
    assert not repaired.graph.value_info
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 5  # the input is not modified
    src = tmp_path / "wrong.onnx"
    onnx.save(model, src)
    before = src.read_bytes()
    with caplog.at_level(logging.WARNING):
        load_model(src)
    assert f"{src}: output 'y' is declared with shape [2, 5]" in caplog.text
    for name, out in _commands(src, tmp_path):
        assert src.read_bytes() == before
        for level in LEVELS:
            _close(name, run(out, {"x": X}, level)[0], run(model, {"x": X}, level)[0])
    report = onnxcomp.fuse(model)  # a ModelProto: the manager repairs it and says so in the notes
    assert any("declared with shape [2, 5]" in n for n in report.notes)


def test_a_model_that_is_wrong_otherwise_is_named_as_the_problem(tmp_path):
    model = mlp(8, 17, initializers_as_inputs=False)
    model.graph.node[1].input[1] = "missing"
    src = tmp_path / "bad.onnx"
    onnx.save(model, src)
    with pytest.raises(
        onnxcomp.errors.ModelLoadError, match=r"bad\.onnx: fails onnx\.checker.*fix or re-export the model"
    ):
        load_model(src)


def test_unchanged_round_trip_never_grows_the_file(tmp_path):
    model = oh.make_model(
        oh.make_graph(
            [oh.make_node("Relu", ["x"], ["y"], name="relu")],
            "plain",
            [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
            [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        ),
        opset_imports=[oh.make_opsetid("", 17)],
        ir_version=8,
    )
    src = tmp_path / "plain.onnx"
    onnx.save(model, src)
    report = onnxcomp.fuse(src, tmp_path / "out.onnx")
    assert not any(step.result.modified for step in report.steps)
    assert (tmp_path / "out.onnx").read_bytes() == src.read_bytes()
