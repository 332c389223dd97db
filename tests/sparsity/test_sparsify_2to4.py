"""sparsify_2to4: masks along the right axis per op, shapes kept, declines, and 2:4 + quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sparse_models import Net, declined, feeds, weight

from onnxcomp.analysis.sparsity import layer_weights, weight_sparsity
from onnxcomp.api import compress, sparsify
from onnxcomp.errors import RecipeError
from onnxcomp.formats.nm import NMPattern, apply_nm, nm_fraction
from onnxcomp.framework.registry import make_pass
from onnxcomp.testing import op_counts, run_model


def mixed_model() -> onnx.ModelProto:
    """Conv Cin=11 -> depthwise -> Conv Cin=2 path, then GAP -> Flatten -> Gemm(transB) -> MatMul."""
    net = Net(shape=("N", 11, 6, 6))
    h = net.op("Relu", [net.conv("x", 11, 8, "conv_a")])
    h = net.conv(h, 8, 8, "dw", group=8)
    h = net.conv(net.conv(h, 8, 2, "narrow", k=1), 2, 6, "conv_cin2")
    h = net.op("Flatten", [net.op("GlobalAveragePool", [h])])
    h = net.gemm(h, 6, 9, "fc")
    return net.build([net.matmul(h, 9, 5, "mm")])


def run_2to4(model: onnx.ModelProto, **options: object):  # noqa: ANN201
    report = compress(model, [make_pass("sparsify_2to4", options)])
    return report.model, report.result("sparsify_2to4")


def test_masks_follow_each_ops_input_channel_axis() -> None:
    model = mixed_model()
    out, result = run_2to4(model)
    assert op_counts(out) == op_counts(model)
    for node, axis in (("conv_a", 1), ("narrow", 1), ("fc", 1), ("mm", 0)):
        np.testing.assert_array_equal(weight(out, node), apply_nm(weight(model, node), axis, NMPattern()))
        assert nm_fraction(weight(out, node), axis, NMPattern()) == 1.0
        assert weight(out, node).shape == weight(model, node).shape
    assert "length 1 <= 2 (a depthwise conv" in declined(result, "dw")
    assert "length 2 <= 2" in declined(result, "conv_cin2")
    np.testing.assert_array_equal(weight(out, "conv_cin2"), weight(model, "conv_cin2"))
    assert result.stats["layers"] == 4 and result.stats["groups_ok"] == result.stats["groups"] > 0
    assert [e["pattern_fraction"] for e in result.data["layers"]] == [1.0] * 4
    again, second = run_2to4(out)
    assert not second.modified and second.stats["already"] == 4
    assert again.SerializeToString() == out.SerializeToString()


def test_skip_other_patterns_and_bad_pattern() -> None:
    model = mixed_model()
    out, result = run_2to4(model, pattern="1:4", skip=["fc*"])
    assert "skipped" in declined(result, "fc")
    np.testing.assert_array_equal(weight(out, "fc"), weight(model, "fc"))
    assert nm_fraction(weight(out, "conv_a"), 1, NMPattern(1, 4)) == 1.0
    with pytest.raises(RecipeError, match="n:m"):
        make_pass("sparsify_2to4", {"pattern": "3:2"})


def test_shared_weight_gets_its_own_copy() -> None:
    net = Net(shape=("N", 8))
    w = net.const(np.random.default_rng(0).standard_normal((8, 8)), "shared")
    a = net.op("MatMul", ["x", w], name="mm_a")
    b = net.op("Gemm", ["x", w], name="gemm_b", transB=1)  # reduces over axis 1 of the same tensor
    model = net.build([a, b], {"x": ["N", 8]})
    out, _ = run_2to4(model)
    assert nm_fraction(weight(out, "mm_a"), 0, NMPattern()) == 1.0
    assert nm_fraction(weight(out, "gemm_b"), 1, NMPattern()) == 1.0


@pytest.mark.parametrize("form", ["dq", "matmulnbits"])
@pytest.mark.parametrize(
    ("fmt", "granularity"), [("int8", "channel"), ("int4", "channel"), ("int4", "group:32"), ("uint8", "channel")]
)
def test_quantized_zeros_stay_exact(fmt: str, granularity: str, form: str, tmp_path: Path) -> None:
    net = Net(shape=("N", 64))
    h = net.op("Relu", [net.gemm("x", 64, 32, "fc1")])
    model = net.build([net.gemm(h, 32, 8, "fc2")], {"x": ["N", 64]})
    weights = {"dtype": fmt, "granularity": granularity, "symmetric": fmt != "uint8"}
    options = {"weights": weights, "activations": "none", "weight_only_format": form}
    out_path = tmp_path / "sq.onnx"
    report = compress(model, [make_pass("sparsify_2to4"), make_pass("quantize", options)], out_path)
    sparse = compress(model, [make_pass("sparsify_2to4")]).model
    rows = {node.name: w for node, _, w in layer_weights(report.model)}
    for name in ("fc1", "fc2"):
        zero = weight(sparse, name) == 0
        assert zero.mean() == 0.5
        row = rows[name] if form == "dq" else rows[name].T  # MatMulNBits zeros come in MatMul layout (K, N)
        assert (row[zero] == 0).all()  # every pruned zero is a zero code (small weights may join them)
        assert weight_sparsity(row, 1)["pattern"] == "2:4"
    record = json.loads(out_path.with_name("sq.quant_record.json").read_text())
    assert [e["weights"]["sparsity"]["pattern"] for e in record] == ["2:4", "2:4"]
    sparse_record = json.loads(out_path.with_name("sq.sparsity_record.json").read_text())
    assert [e["node"] for e in sparse_record["layers"]] == ["fc1", "fc2"]
    x = feeds(model)
    got, want = run_model(report.model, x)[0], run_model(sparse, x)[0]
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95


def test_simulated_dequantized_weights_keep_the_pattern() -> None:
    model = mixed_model()
    options = {
        "weights": {"dtype": "int8", "granularity": "tensor", "symmetric": False},
        "activations": "none",
        "emit": "simulate",
    }
    out = compress(model, [make_pass("sparsify_2to4"), make_pass("quantize", options)]).model
    init = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    fake = next(v for k, v in init.items() if k.startswith("conv_a") and "fakequant" in k)
    assert weight_sparsity(fake, 1)["pattern"] == "2:4"  # asymmetric: q = zero point -> exactly 0.0


def test_api_2to4_int8_on_demo(tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parents[2] / "models" / "digits_cnn.onnx"
    report = sparsify(demo, tmp_path / "d.onnx", pattern="2:4", quantize="int8")
    result = report.result("sparsify_2to4")
    assert result.stats["groups_ok"] == result.stats["groups"]
    assert "length 1 <= 2" in declined(result, "conv1")
    assert report.result("quantize").stats["nodes"] == 6
