"""prune_channels: reconstruction, data-driven choice, ratios/scope/rounding/skip, one sparsity per layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from sparse_models import Net, assert_same_outputs, declined, feeds, prune, weight

from onnxcomp.api import compress
from onnxcomp.errors import PassError, RecipeError
from onnxcomp.framework.registry import make_pass
from onnxcomp.testing import run_model


def chain(depth: int = 1, seed: int = 0) -> onnx.ModelProto:
    """x[N,4,6,6] -> (Conv 8 -> Relu) * depth -> Conv 3 -> y (random weights)."""
    net = Net(seed=seed)
    h, c = "x", 4
    for i in range(depth):
        h, c = net.op("Relu", [net.conv(h, c, 8, f"conv{i + 1}")]), 8
    return net.build([net.conv(h, c, 3, "head")])


def calib(model: onnx.ModelProto, n: int = 48) -> dict[str, np.ndarray]:
    return feeds(model, n=n, seed=7)


def output_error(model: onnx.ModelProto, pruned: onnx.ModelProto, data: dict[str, np.ndarray]) -> float:
    want, got = run_model(model, data)[0], run_model(pruned, data)[0]
    return float(np.sum((got - want) ** 2) / np.sum(want**2))


@pytest.mark.parametrize("depth", [1, 3])
def test_reconstruction_strictly_lowers_the_consumer_error(depth: int) -> None:
    model = chain(depth)
    data = calib(model)
    plain, _ = prune(model, data, ratio=0.5, refit=False)
    refit, result = prune(model, data, ratio=0.5)
    assert output_error(model, refit, data) < output_error(model, plain, data) * 0.9
    held_out = feeds(model, n=32, seed=99)
    assert output_error(model, refit, held_out) < output_error(model, plain, held_out)
    assert result.stats["refit"] == depth
    for entry in result.data["layers"]:
        for sink in entry["sinks"]:
            assert 0 <= sink["error_refit"] < sink["error_pruned"]
    if depth == 1:  # the head is the one consumer: its reported error is the measured output error
        sink = result.data["layers"][0]["sinks"][0]
        assert sink["error_refit"] == pytest.approx(output_error(model, refit, data), rel=0.05, abs=1e-6)


def test_refit_gemm_and_matmul_sinks() -> None:
    net = Net(shape=("N", 12))
    h = net.op("Relu", [net.gemm("x", 12, 10, "fc1")])
    h = net.op("Relu", [net.gemm(h, 10, 8, "fc2", trans_b=0)])
    model = net.build([net.matmul(h, 8, 4, "mm")], {"x": ["N", 12]})
    data = calib(model, n=64)
    plain, _ = prune(model, data, ratio=0.4, refit=False)
    refit, result = prune(model, data, ratio=0.4)
    assert output_error(model, refit, data) < output_error(model, plain, data)
    assert result.stats["refit"] == 2
    assert [n.op_type for n in refit.graph.node].count("Add") == 1  # the MatMul's refit bias


def test_data_criterion_finds_channels_dead_after_relu() -> None:
    net = Net()
    conv = net.conv("x", 4, 8, "conv1")
    w, b = [t for t in net.inits if t.name in ("conv1.w", "conv1.b")]
    w_value = onnx.numpy_helper.to_array(w).copy()
    b_value = onnx.numpy_helper.to_array(b).copy()
    w_value[[0, 5]] *= 10.0  # the largest weights ...
    b_value[[0, 5]] = -1e3  # ... but Relu always outputs 0 there
    w.CopyFrom(onnx.numpy_helper.from_array(w_value, w.name))
    b.CopyFrom(onnx.numpy_helper.from_array(b_value, b.name))
    model = net.build([net.conv(net.op("Relu", [conv]), 8, 3, "head")])
    data = calib(model)
    by_data, _ = prune(model, data, ratio=0.25, criterion="data", refit=False)
    assert_same_outputs(model, by_data)
    np.testing.assert_array_equal(weight(by_data, "conv1"), np.delete(w_value, [0, 5], axis=0))
    by_norm, _ = prune(model, ratio=0.25, criterion="l1")
    assert output_error(model, by_norm, data) > 1e-3


def test_ratios_rounding_skip_and_global_scope() -> None:
    model = chain(3)
    out, result = prune(model, ratio=0.25, ratios={"conv2": 0.5}, skip=["conv3"])
    assert [weight(out, f"conv{i}").shape[0] for i in (1, 2, 3)] == [6, 4, 8]
    assert "skipped" in declined(result, "conv3")
    out, result = prune(model, ratio=0.25, round_to=8)
    assert "keeps all 8 channels" in declined(result, "conv1") and not result.modified
    out, _ = prune(model, ratio=0.4, round_to=4)
    assert [weight(out, f"conv{i}").shape[0] for i in (1, 2, 3)] == [8, 8, 8]  # 8 - 3 = 5 -> 8
    out, result = prune(model, ratio=0.5, scope="global", max_ratio=0.75)
    kept = [weight(out, f"conv{i}").shape[0] for i in (1, 2, 3)]
    assert sum(kept) == 12 and min(kept) >= 2
    with pytest.raises(RecipeError, match="ratio"):
        make_pass("prune_channels", {"ratio": 1.0})


def test_reconstruction_needs_calibration_data() -> None:
    with pytest.raises(PassError, match="needs calibration data"):
        prune(chain(), ratio=0.25, refit=True)
    with pytest.raises(PassError, match="criterion 'data'"):
        prune(chain(), ratio=0.25, criterion="data")


def test_deterministic_and_input_untouched() -> None:
    model = chain(2)
    before = model.SerializeToString()
    data = calib(model)
    first, _ = prune(model, data, ratio=0.3, criterion="data")
    second, _ = prune(model, data, ratio=0.3, criterion="data")
    assert first.SerializeToString() == second.SerializeToString()
    assert model.SerializeToString() == before


def test_one_kind_of_sparsity_per_layer() -> None:
    model = chain(2)
    prune_pass = make_pass("prune_channels", {"ratio": 0.25, "refit": False})
    report = compress(model, [make_pass("sparsify_2to4"), prune_pass])
    result = report.result("prune_channels")
    assert "n:m sparse" in declined(result, "conv1") and not result.modified
    report = compress(model, [prune_pass, make_pass("sparsify_2to4")])
    result = report.result("sparsify_2to4")
    assert "channel-pruned earlier" in declined(result, "conv1")
    assert "head" in result.changed[-1]  # a consumer may still be 2:4-sparsified
    sparse = compress(model, [make_pass("sparsify_2to4")]).model  # across runs: detected from the values
    result = compress(sparse, [prune_pass]).result("prune_channels")
    assert "n:m sparse" in declined(result, "conv1")
