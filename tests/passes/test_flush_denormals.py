"""flush_denormals: subnormal weights become zero; outputs unchanged within float rounding."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.framework.manager import PassManager
from onnxcomp.framework.registry import make_pass
from onnxcomp.testing import run_model


def test_flush_denormals() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    w[0, :3] = [1e-40, -3e-39, 1e-45]  # subnormal
    w[1, 0] = np.finfo(np.float32).tiny  # smallest normal: kept
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = PassManager([make_pass("flush_denormals")]).run(model)
    assert report.steps[0].result.stats == {"tensors": 1, "values": 3}
    out = numpy_helper.to_array(report.model.graph.initializer[0])
    assert (out[0, :3] == 0).all() and out[1, 0] == np.finfo(np.float32).tiny
    np.testing.assert_array_equal(out[2:], w[2:])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run_model(report.model, {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-6, atol=1e-30
    )
    again = PassManager([make_pass("flush_denormals")]).run(report.model)
    assert not again.steps[0].result.modified
