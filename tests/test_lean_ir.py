"""Shape inference and opset conversion without copies of the weights (ir.infer_shapes, ir.upgrade_graph).

Both hand onnx a model whose weight-sized initializers carry dims and type but no data; these
tests pin that the results are those of the full model, byte for byte, that the caller's
weights are neither changed nor copied, and that a conversion that touches a weight falls back.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import ir
from onnxcomp.framework.manager import convert_opset
from onnxcomp.testing import run_model

DEMO = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"


def _matmul_reshape(opset: int = 13) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w")  # 24 KiB: a weight
    shape = numpy_helper.from_array(np.array([-1, 8, 12], np.int64), "shape")  # read by inference: kept
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [w, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_infer_shapes_reads_shape_inputs_and_leaves_weights_alone() -> None:
    model = _matmul_reshape()
    graph = ir.import_model(model)
    weight = graph.tensors()["w"]
    before = np.array(ir.constant_value(weight), copy=True)
    ir.infer_shapes(graph)
    assert graph.tensors()["y"].shape == ["n", 96]
    assert graph.tensors()["z"].shape[1:] == [8, 12]  # the shape initializer was read
    np.testing.assert_array_equal(ir.constant_value(graph.tensors()["w"]), before)  # data still there


def test_upgrade_graph_equals_full_conversion_and_shares_the_weights() -> None:
    model = onnx.load(str(DEMO))
    graph = ir.import_model(model)
    convert = partial(convert_opset, target=21, why="test")
    upgraded = ir.upgrade_graph(graph, model, convert)
    assert upgraded is not None and ir.default_opset(upgraded) == 21
    full = ir.import_model(convert(ir.export_model(graph, model)))
    fast_bytes = ir.export_model(upgraded, model).SerializeToString(deterministic=True)
    assert fast_bytes == ir.export_model(full, model).SerializeToString(deterministic=True)
    weights = [n for n, t in graph.tensors().items() if isinstance(t, ir.Constant) and t._values.nbytes > 4096]  # noqa: SLF001
    assert weights  # the demo's conv weights are weight-sized
    for name in weights:  # the very same values object: no copy was made
        assert upgraded.tensors()[name]._values is graph.tensors()[name]._values  # noqa: SLF001
    x = np.random.default_rng(1).standard_normal((2, 1, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(
        run_model(onnx.load_from_string(fast_bytes), {"input": x})[0], run_model(model, {"input": x})[0]
    )


def test_upgrade_graph_declines_when_the_converter_changes_a_weight() -> None:
    model = _matmul_reshape()
    graph = ir.import_model(model)

    def reshaping_converter(m: onnx.ModelProto) -> onnx.ModelProto:
        converted = convert_opset(m, 21, "test")
        for tensor in converted.graph.initializer:
            if tensor.name == "w":
                tensor.dims[:] = [96, 64]  # a weight the converter rewrote: its data cannot go back
        return converted

    assert ir.upgrade_graph(graph, model, reshaping_converter) is None
