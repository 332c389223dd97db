"""runtime.fits_protobuf: the exact answer of ``ByteSize() < 2 GiB`` from a bound that does not serialise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import runtime
from onnxcomp.api import quantize

MODELS = Path(__file__).resolve().parents[1] / "models"


def _varied_model() -> onnx.ModelProto:
    """Initializers in every storage the bound reads: raw float / float16 / int4 / int64, typed
    float_data and negative int32_data (10-byte varints), external data; a Constant node, an If
    body with its own initializer, metadata and docs."""
    rng = np.random.default_rng(0)
    raw = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    half = numpy_helper.from_array(rng.standard_normal(7).astype(np.float16), "h")
    codes = helper.make_tensor("q", TensorProto.INT4, [5], [-8, 7, 1, 0, -1])
    big = numpy_helper.from_array(np.arange(100, dtype=np.int64) - 50, "i64")
    typed = helper.make_tensor("f", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    negative = helper.make_tensor("n", TensorProto.INT32, [6], [-1, -(2**31), 5, -7, 0, 2**31 - 1])
    external = TensorProto(name="e", data_type=TensorProto.FLOAT, dims=[1000])
    external.data_location = TensorProto.EXTERNAL
    external.external_data.add(key="location", value="e.bin")
    body = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y_then"])],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [8])],
        [numpy_helper.from_array(np.ones(8, np.float32), "b")],
    )
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(64, np.float32))),
        helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body, doc_string="an if"),
    ]
    graph = helper.make_graph(
        nodes,
        "g" * 40,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])],
        [raw, half, codes, big, typed, negative, external],
        doc_string="docs \u00e9\u4e2d",
    )
    model = helper.make_model(graph, producer_name="test", doc_string="model docs")
    helper.set_model_props(model, {"k": "v" * 100})
    return model


@pytest.mark.parametrize("name", ["varied", "digits", "digits_int4"])
def test_bound_is_above_the_size(name: str, tmp_path: Path) -> None:
    if name == "varied":
        model = _varied_model()
    elif name == "digits":
        model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    else:
        out = tmp_path / "q.onnx"
        quantize(MODELS / "digits_cnn.onnx", out, weights="int4", activations="none", reports=False)
        model = onnx.load(str(out))
    assert runtime._size_bound(model) >= model.ByteSize()  # noqa: SLF001
    assert runtime.fits_protobuf(model)


def test_too_big_is_confirmed_by_the_exact_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bound at the limit asks ByteSize(), whose answer is the one returned."""
    model = _varied_model()
    monkeypatch.setattr(runtime, "PROTOBUF_LIMIT", runtime._size_bound(model))  # noqa: SLF001
    assert runtime.fits_protobuf(model)  # the bound is not below the limit, the real size is
    monkeypatch.setattr(runtime, "PROTOBUF_LIMIT", model.ByteSize())
    assert not runtime.fits_protobuf(model)
    strings = helper.make_tensor("s", TensorProto.STRING, [2], [b"a", b"b"])
    model.graph.initializer.append(strings)  # strings: no bound, the exact size decides
    assert runtime._size_bound(model) == runtime.PROTOBUF_LIMIT  # noqa: SLF001
    assert not runtime.fits_protobuf(model)
