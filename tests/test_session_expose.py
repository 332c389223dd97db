"""ort_session(expose=...): intermediate tensors as outputs without copying the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp.runtime import _outputs_suffix, ort_session, with_outputs

DEMO = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"


def test_exposed_tensors_equal_the_copy_with_outputs() -> None:
    model = onnx.load(DEMO)
    before = model.SerializeToString()
    names = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Relu")]
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    feed = {model.graph.input[0].name: x}
    exposed = ort_session(model, level="disable", expose=names)
    copied = ort_session(with_outputs(model, names), level="disable")
    assert [o.name for o in exposed.get_outputs()] == [o.name for o in copied.get_outputs()]
    for a, b in zip(exposed.run(None, feed), copied.run(None, feed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.SerializeToString() == before  # the caller's model is not touched


def test_suffix_parses_as_the_model_with_outputs() -> None:
    model = onnx.load(DEMO)
    names = [model.graph.node[0].output[0], model.graph.output[0].name]  # an existing output is not repeated
    merged = onnx.ModelProto.FromString(model.SerializeToString() + _outputs_suffix(model, names))
    assert merged == with_outputs(model, names)


def test_expose_needs_an_in_memory_model() -> None:
    with pytest.raises(TypeError, match="in-memory"):
        ort_session(DEMO, expose=["x"])
