"""Embedding tables in 8 and 4 bits: exactly the codec's rows, gathered before dequantization."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from real_models import make_inputs, real_model

from onnxcomp import quantize
from onnxcomp.analysis.metrics import cosine
from onnxcomp.errors import PassError, RecipeError
from onnxcomp.quant.embeddings import ROW_LAYOUT
from onnxcomp.quant.spec import parse_embedding_spec
from onnxcomp.quant.weights import quantize_weight
from onnxcomp.testing import op_counts, run_model

V, D = 50, 64


def _lookup(table: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=0)],
        "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, D])],
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("fmt", "ops"), [("int8", {"Gather": 2, "Cast": 1, "Mul": 1}), ("int4", {"GatherBlockQuantized": 1})]
)
def test_gathered_rows_are_exactly_the_codec_rows(fmt: str, ops: dict) -> None:
    table = (np.random.default_rng(0).standard_normal((V, D)) * np.linspace(0.1, 3, V)[:, None]).astype(np.float32)
    out = quantize(_lookup(table), activations="none", embeddings=fmt, fuse=False).model
    assert op_counts(out) == ops
    ids = np.array([[0, 7, 49], [3, 3, 12]], np.int64)
    want = quantize_weight(table, parse_embedding_spec(fmt), ROW_LAYOUT, "table").dequantized[ids]
    for level in ("disable", "all"):
        np.testing.assert_array_equal(run_model(out, {"ids": ids}, level=level)[0], want)
    stored = {t.name: t for t in out.graph.initializer}
    assert stored["table_quantized"].data_type == (TensorProto.INT8 if fmt == "int8" else TensorProto.INT4)


def test_bad_embedding_formats_are_one_line_errors() -> None:
    table = np.ones((V, D), np.float32)
    with pytest.raises((RecipeError, PassError), match="embedding tables are stored as int8"):
        quantize(_lookup(table), activations="none", embeddings="fp8_e4m3", fuse=False)


def test_sentence_encoder_embeddings() -> None:
    """MiniLM: the token table is most of the file; int8 rows keep the sentence embedding."""
    name = "minilm_l3"
    path = real_model(name)
    feeds = make_inputs(name, 8, 0)
    feeds = feeds[0] if isinstance(feeds, tuple) else feeds
    model = onnx.load(path)
    plain = quantize(model, weights="int8", activations="none").model
    small = quantize(model, weights="int8", activations="none", embeddings="int8").model
    ref = run_model(model, feeds)
    idx = [o.name for o in model.graph.output].index("461")
    got = run_model(small, feeds)[idx]
    assert cosine(ref[idx], got) > 0.999 and cosine(ref[idx], run_model(plain, feeds)[idx]) > 0.999
    assert small.ByteSize() < 0.45 * plain.ByteSize()  # 46.9 MB of fp32 rows -> 11.7 MB of int8
