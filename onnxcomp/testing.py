"""Numeric oracles shared by tests, benchmarks and the demo: run models in onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnxcomp.runtime import ort_session

_NP_OF_ONNX = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer (symbolic dims -> ``batch``)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in ttype.shape.dim]
        dtype = _NP_OF_ONNX[ttype.elem_type]
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[value.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def run_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], level: str = "all") -> list[np.ndarray]:
    """All graph outputs of ``model`` on ``feeds`` through onnxruntime's CPU provider."""
    session = ort_session(model, level=level)
    return session.run(None, dict(feeds))


def assert_numerically_equal(
    expected: onnx.ModelProto,
    actual: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> None:
    """Outputs of two models agree on ``feeds`` within tolerance (and both at ALL and DISABLE_ALL)."""
    want = run_model(expected, feeds, level="disable")
    for level in ("disable", "all"):
        got = run_model(actual, feeds, level=level)
        assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"output {i} at level {level}")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Histogram of node op types in the main graph."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
