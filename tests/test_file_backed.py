"""A model read unchanged from a file: its calibration sessions read that file, with the same results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import runtime
from onnxcomp.runtime import file_backed, ort_session


def _mlp(seed: int) -> onnx.ModelProto:
    """MatMul -> Relu -> MatMul: nothing for the deployment fusions to change."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sessions_read_the_backing_file(tmp_path: Path) -> None:
    """While backed, a session of the in-memory model is the file's (plus the exposed outputs):
    backed by a file with other weights, it computes those."""
    model, other = _mlp(0), _mlp(1)
    path = tmp_path / "other.onnx"
    onnx.save(other, str(path))
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    own = ort_session(model, level="disable", expose=["h"]).run(["y", "h"], {"x": x})
    theirs = ort_session(other, level="disable", expose=["h"]).run(["y", "h"], {"x": x})
    with file_backed(model, path):
        backed = ort_session(model, level="disable", expose=["h"]).run(["y", "h"], {"x": x})
        plain = ort_session(model, level="disable").run(["y"], {"x": x})
    after = ort_session(model, level="disable", expose=["h"]).run(["y", "h"], {"x": x})
    for got, want in zip(backed, theirs, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(plain[0], theirs[0])
    for got, want in zip(after, own, strict=True):  # the registration ends with the block
        np.testing.assert_array_equal(got, want)


def test_external_data_is_not_backed(tmp_path: Path) -> None:
    """A model whose weights live beside the file is served from memory as before."""
    onnx.save(_mlp(0), str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    references = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    with file_backed(references, tmp_path / "ext.onnx"):
        assert id(references) not in runtime._FILE_BACKED  # noqa: SLF001
    loaded = onnx.load(str(tmp_path / "ext.onnx"))  # the weights in memory, the file has references only
    with file_backed(loaded, tmp_path / "ext.onnx"):
        assert id(loaded) not in runtime._FILE_BACKED  # noqa: SLF001


def test_a_file_that_does_not_load_falls_back_to_the_model(tmp_path: Path) -> None:
    """A registered file onnxruntime cannot load alone (its data is missing): the in-memory model
    is serialised instead, as without the registration."""
    model = _mlp(0)
    onnx.save(_mlp(0), str(tmp_path / "ext.onnx"), save_as_external_data=True, location="gone.data", size_threshold=0)
    (tmp_path / "gone.data").unlink()
    x = np.ones((2, 16), np.float32)
    want = ort_session(model, level="disable", expose=["h"]).run(["y", "h"], {"x": x})
    runtime._FILE_BACKED[id(model)] = (model, tmp_path / "ext.onnx")  # noqa: SLF001 - as if registered
    try:
        got = ort_session(model, level="disable", expose=["h"]).run(["y", "h"], {"x": x})
    finally:
        runtime._FILE_BACKED.pop(id(model))  # noqa: SLF001
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
