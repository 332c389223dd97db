"""flush_denormals: subnormal weights become zero; outputs unchanged within float rounding."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.framework.manager import PassManager
from onnxcomp.framework.registry import make_pass
from onnxcomp.passes.flush_denormals import count_subnormals
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


def test_count_subnormals_matches_the_definition() -> None:
    """The bit test counts what 0 < |x| < smallest normal counts: every float16 bit pattern, and
    float32 / float64 arrays spanning several scratch chunks with zeros, -0, the smallest normal,
    the smallest subnormal, inf and NaN."""
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    arrays: list[np.ndarray] = [every_half]
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        info = np.finfo(dtype)
        x = rng.standard_normal(3 * (1 << 16) + 5).astype(dtype)
        picks = rng.choice(x.size, 900, replace=False)
        x[picks[:400]] = (info.tiny * rng.uniform(-1, 1, 400)).astype(dtype)
        x[picks[400:500]] = 0.0
        x[picks[500:600]] = -0.0
        x[picks[600:700]] = info.tiny
        x[picks[700:800]] = -info.smallest_subnormal
        x[picks[800:850]] = np.inf
        x[picks[850:]] = np.nan
        arrays += [x, x[:-1].reshape(-1, 4)[:, 1:3], x[:1]]
    for x in arrays:
        with np.errstate(invalid="ignore"):
            expected = int(np.count_nonzero((x != 0) & (np.abs(x) < np.finfo(x.dtype).tiny)))
        assert count_subnormals(x) == expected
    assert count_subnormals(every_half) == 2 * 1023  # both signs of every non-zero mantissa
