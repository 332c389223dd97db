"""decompose_conv: exact at full rank for every geometry, the seed's 66.7% example, each decline."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from decomp_models import (
    CONV_PERMISSIVE,
    FULL_RANK,
    conv_macs,
    conv_model,
    make_model,
    run_pass,
    smooth_batches,
)
from onnx import helper, numpy_helper

from onnxcomp.errors import PassError
from onnxcomp.testing import (
    assert_numerically_equal,
    op_counts,
    random_feeds,
    run_model,
)

GEOMETRIES: dict[str, dict[str, Any]] = {
    "pad1": {"pads": [1, 1, 1, 1]},
    "stride_h2": {"strides": [2, 1], "pads": [1, 1, 1, 1]},
    "stride_w2": {"strides": [1, 2], "pads": [1, 1, 1, 1]},
    "stride_2": {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    "stride_3": {"strides": [3, 3]},
    "asymmetric_pads": {"pads": [0, 2, 1, 0]},
    "same_upper_stride2": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "same_lower_stride2": {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    "valid": {"auto_pad": "VALID"},
    "dilation_h2": {"dilations": [2, 1], "pads": [2, 1, 2, 1]},
    "dilation_w2": {"dilations": [1, 2], "pads": [1, 2, 1, 2]},
    "dilation_stride_asym": {"dilations": [2, 3], "strides": [2, 1], "pads": [1, 3, 2, 0]},
    "kernel_3x5": {"kernel": (3, 5), "pads": [1, 2, 1, 2]},
    "kernel_5x3_stride_w2": {"kernel": (5, 3), "strides": [1, 2], "pads": [2, 0, 1, 1]},
    "kernel_4x4_same_upper": {"kernel": (4, 4), "auto_pad": "SAME_UPPER"},
    "no_bias": {"bias": False, "pads": [1, 1, 1, 1]},
    "kernel_1x1_min_kernel_1": {"kernel": (1, 1)},  # a 1x1 conv is a matrix: W ~= A @ B
    "kernel_1x3_min_kernel_1": {"kernel": (1, 3), "pads": [0, 1, 0, 1]},
}


@pytest.mark.parametrize("case", list(GEOMETRIES))
def test_full_rank_reproduces_the_conv(case: str) -> None:
    attrs = dict(GEOMETRIES[case])
    kernel, bias = attrs.pop("kernel", (3, 3)), attrs.pop("bias", True)
    model = conv_model(kernel=kernel, bias=bias, **attrs)
    report, result = run_pass(model, rank_rule=FULL_RANK, **CONV_PERMISSIVE)
    assert result.stats["decomposed"] == 1, result.declined
    assert op_counts(report.model) == {"Conv": 2}
    entry = result.data["record"]["nodes"][0]
    assert entry["rank"] == entry["max_rank"] == min(4 * kernel[0], 6 * kernel[1])
    assert entry["factor_shapes"] == [[entry["rank"], 4, kernel[0], 1], [6, entry["rank"], 1, kernel[1]]]
    assert_numerically_equal(model, report.model, random_feeds(model, seed=1, batch=3), rtol=1e-4, atol=1e-5)


def test_factor_attributes_keep_their_own_axis() -> None:
    model = conv_model(strides=[2, 1], dilations=[1, 2], pads=[1, 2, 0, 3])
    report, _ = run_pass(model, rank_rule="rank:4", **CONV_PERMISSIVE)
    first, second = report.model.graph.node
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in (first, second)]
    common = {"group": 1}
    assert attrs[0] == {"kernel_shape": [3, 1], "strides": [2, 1], "dilations": [1, 1], "pads": [1, 0, 0, 0], **common}
    assert attrs[1] == {"kernel_shape": [1, 3], "strides": [1, 1], "dilations": [1, 2], "pads": [0, 2, 0, 3], **common}
    assert len(first.input) == 2 and len(second.input) == 3  # bias only on the second factor
    assert (first.name, second.name) == ("conv_3x1", "conv_1x3")


def test_seed_example_removes_two_thirds_of_the_macs() -> None:
    """64x64x3x3 -> 32x64x3x1 + 64x32x1x3: 1 - (32*64*3 + 64*32*3) / (64*64*9) = 66.7%."""
    model = conv_model(cin=64, cout=64, hw=(16, 16), batch=1, pads=[1, 1, 1, 1])
    before = conv_macs(model)
    for rule in ("rank:32", "auto"):  # the automatic band for 64x64x3x3 is [27, 32] -> 32
        report, result = run_pass(model, rank_rule=rule)
        entry = result.data["record"]["nodes"][0]
        assert entry["factor_shapes"] == [[32, 64, 3, 1], [64, 32, 1, 3]]
        after = conv_macs(report.model)
        assert 3 * after == before
        assert round((1 - after / before) * 100, 1) == 66.7
        assert (entry["macs_before"], entry["macs_after"]) == (before, after)
    assert entry["detail"]["band"] == [27, 32]


def test_two_runs_are_byte_identical() -> None:
    model = conv_model(cin=64, cout=64, pads=[1, 1, 1, 1])
    first = run_pass(model)[0].model.SerializeToString()
    assert run_pass(model)[0].model.SerializeToString() == first


def test_refit_on_calibration_data_reduces_output_error() -> None:
    model = conv_model(cin=64, cout=64, hw=(12, 12), pads=[1, 1, 1, 1], strides=[1, 2])
    calib = smooth_batches((4, 64, 12, 12), 6, seed=0)
    held_out = smooth_batches((4, 64, 12, 12), 2, seed=99)
    plain, _ = run_pass(model, rank_rule="rank:16")
    refit, result = run_pass(model, calibration=calib, rank_rule="rank:16")
    fit = result.data["record"]["nodes"][0]["refit"]
    assert fit["rows"] == 6 * 4 * 12 * 6 and fit["error_refit"] < 0.7 * fit["error_svd"]

    def error(m: onnx.ModelProto) -> float:
        errs = [
            np.linalg.norm(run_model(m, b)[0] - run_model(model, b)[0]) / np.linalg.norm(run_model(model, b)[0])
            for b in held_out
        ]
        return float(np.mean(errs))

    assert error(refit.model) < 0.85 * error(plain.model)
    assert result.data["record"]["passes"]["decompose_conv"]["refit"] is True


@pytest.mark.parametrize("case", ["pad1", "same_lower_stride2", "dilation_stride_asym", "kernel_5x3_stride_w2"])
def test_refit_of_an_exact_pair_is_exact(case: str) -> None:
    """At full rank the least-squares design must reproduce the conv: residual ~ 0."""
    attrs = dict(GEOMETRIES[case])
    kernel = attrs.pop("kernel", (3, 3))
    model = conv_model(kernel=kernel, hw=(10, 11), **attrs)
    calib = smooth_batches((2, 4, 10, 11), 3, seed=0)
    report, result = run_pass(model, calibration=calib, rank_rule=FULL_RANK, **CONV_PERMISSIVE)
    fit = result.data["record"]["nodes"][0]["refit"]
    assert fit["error_svd"] < 1e-10 and fit["error_refit"] < 1e-10
    assert_numerically_equal(model, report.model, calib[0], rtol=1e-4, atol=1e-5)


def test_no_calibration_keeps_svd_factors_with_a_note() -> None:
    _, result = run_pass(conv_model(cin=64, cout=64), rank_rule="rank:16")
    assert result.data["record"]["nodes"][0]["refit"] is None
    assert any("no calibration data" in n for n in result.notes)


# --- declines ----------------------------------------------------------------------------------

DECLINES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # case: (model kwargs, pass options, reason fragment)
    "grouped": ({"cin": 64, "cout": 64, "group": 2}, {}, "grouped (group=2)"),
    "depthwise": ({"cin": 64, "cout": 64, "group": 64}, {}, "grouped (depthwise, group=64)"),
    "dilated": ({"cin": 64, "cout": 64, "dilations": [2, 2]}, {}, "dilated (dilations=[2, 2])"),
    "kernel_1x1": ({"cin": 64, "cout": 64, "kernel": (1, 1)}, {}, "kernel 1x1 has a side < 3"),
    "kernel_3x1": ({"cin": 64, "cout": 64, "kernel": (3, 1)}, {}, "kernel 3x1 has a side < 3"),
    "stride_3": ({"cin": 64, "cout": 64, "strides": [1, 3]}, {}, "stride [1, 3] exceeds 2"),
    "too_small_product": ({"cin": 1, "cout": 64}, {"min_channels": 0}, "min(kernel) * min(channels) = 3 * 1 < 16"),
    "too_small_channels": ({"cin": 32, "cout": 64}, {}, "min(channels) 32 < 64"),
    "no_mac_saving": ({"cin": 64, "cout": 64}, {"rank_rule": "rank:160"}, "would not save MACs"),
    "skip_glob": ({"cin": 64, "cout": 64}, {"skip": ["co*"]}, "matches a skip pattern"),
    "zero_weight": ({"cin": 64, "cout": 64, "weight": np.zeros((64, 64, 3, 3))}, {}, "all zeros"),
}


@pytest.mark.parametrize("case", list(DECLINES))
def test_decline(case: str) -> None:
    model_kwargs, options, reason = DECLINES[case]
    model = conv_model(**model_kwargs)
    report, result = run_pass(model, **options)
    assert not result.modified and result.stats["decomposed"] == 0
    assert report.model.graph.node[0].op_type == "Conv" and len(report.model.graph.node) == 1
    assert result.declined == [("conv", result.declined[0][1])] and reason in result.declined[0][1], result.declined
    assert result.data["record"]["declined"][0]["reason"] == result.declined[0][1]


def test_decline_too_small_thresholds_are_options() -> None:
    _, result = run_pass(conv_model(cin=32, cout=64), min_channels=32)
    assert result.stats["decomposed"] == 1


def test_decline_non_constant_weight_and_1d_conv() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    dynamic = make_model([node], {"x": ["N", 64, 8, 8], "w": [64, 64, 3, 3]}, [])
    assert "'w' of Conv 'conv' is not a constant" in run_pass(dynamic)[1].declined[0][1]
    w1d = numpy_helper.from_array(np.ones((64, 64, 3), np.float32), "w")
    conv1d = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], {"x": ["N", 64, 9]}, [w1d])
    assert "1-D convolution; only 2-D" in run_pass(conv1d)[1].declined[0][1]


def test_bad_rank_rule_is_a_recipe_error() -> None:
    from onnxcomp.errors import RecipeError
    from onnxcomp.framework.registry import make_pass

    with pytest.raises(RecipeError, match="rank rule 'ratio:2'"):
        make_pass("decompose_conv", {"rank_rule": "ratio:2"})


def test_record_of_a_missing_node_is_a_one_line_error(tmp_path: Any) -> None:
    record = tmp_path / "r.json"
    record.write_text(
        '{"format": "onnxcomp-decomposition/1", "nodes": [{"pass": "decompose_conv", "node": "nope", "rank": 16}]}'
    )
    with pytest.raises(PassError, match="record names 'nope', not a Conv node"):
        run_pass(conv_model(cin=64, cout=64), record=str(record))
