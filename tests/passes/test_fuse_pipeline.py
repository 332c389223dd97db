"""The ``fuse`` pipeline (FUSE_PIPELINE) on a model mixing every fusion."""

from __future__ import annotations

import numpy as np
from fusion_models import bn_node, bn_params, counts, init, model, randn, rng
from onnx import helper

from onnxcomp.flags import FUSE_PIPELINE
from onnxcomp.framework.manager import PassManager
from onnxcomp.framework.registry import make_pass
from onnxcomp.testing import assert_numerically_equal, random_feeds


def _mixed_model():
    r = rng(42)
    k = np.abs(r.standard_normal(6)) + 0.5
    inits = [
        randn(r, "W1", [8, 3, 3, 3]), randn(r, "b1", [8]), *bn_params(r, "bn_conv", 8),
        randn(r, "Wt", [8, 3, 2, 2]), *bn_params(r, "bn_convt", 6),
        *bn_params(r, "bn_relu", 6),
        randn(r, "B3", [10, 6]), randn(r, "C3", [10]), *bn_params(r, "bn_gemm", 10),
        randn(r, "W4", [10, 7]), randn(r, "b4", [7]), *bn_params(r, "bn_matmul", 7),
        init("k_mul", k), init("k_add", k),  # identical bytes: deduplicated
    ]  # fmt: skip
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"], name="identity"),
        helper.make_node("Conv", ["xi", "W1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c1", "n1", "bn_conv"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "Wt"], ["ct"], name="convt", group=2, strides=[2, 2]),
        bn_node("ct", "n2", "bn_convt"),
        helper.make_node("Relu", ["n2"], ["r2"]),
        helper.make_node("Dropout", ["r2"], ["d"], name="dropout"),
        bn_node("d", "n5", "bn_relu"),  # after Relu once the Dropout is gone: lowered
        helper.make_node("GlobalAveragePool", ["n5"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["f"]),
        helper.make_node("Gemm", ["f", "B3", "C3"], ["g"], name="gemm", transB=1, alpha=0.5),
        bn_node("g", "n3", "bn_gemm"),
        helper.make_node("Relu", ["n3"], ["r3"]),
        helper.make_node("MatMul", ["r3", "W4"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "b4"], ["mma"], name="matmul_bias"),
        bn_node("mma", "y", "bn_matmul"),
        helper.make_node("Mul", ["f", "k_mul"], ["fm"]),
        helper.make_node("Add", ["fm", "k_add"], ["z"]),
    ]
    return model(nodes, {"x": [2, 3, 8, 8]}, {"y": [2, 7], "z": [2, 6]}, inits)


def _run(m):
    return PassManager([make_pass(name) for name in FUSE_PIPELINE]).run(m)


def test_fuse_pipeline_order() -> None:
    assert FUSE_PIPELINE == (
        "fold_weight_constants",
        "remove_identity",
        "fold_batchnorm",
        "fuse_matmul_add",
        "fold_affine",
        "lower_batchnorm",
        "fuse_hardswish",
        "flush_denormals",
        "dedupe_initializers",
    )


def test_fuse_pipeline_removes_every_batchnorm() -> None:
    src = _mixed_model()
    report = _run(src)
    out = report.model
    assert_numerically_equal(src, out, random_feeds(src, seed=3))
    assert counts(out) == {
        "Conv": 1, "ConvTranspose": 1, "Relu": 3, "Mul": 2, "Add": 2,
        "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 2,
    }  # fmt: skip
    assert report.result("fold_batchnorm").stats == {"folded": 4}
    assert report.result("lower_batchnorm").stats == {"lowered": 1}
    assert report.result("fuse_matmul_add").stats == {"fused": 1}
    assert report.result("dedupe_initializers").stats["merged"] == 1
    assert [o.name for o in out.graph.output] == ["y", "z"]
    again = _run(out)
    assert not any(step.result.modified for step in again.steps)
    assert _run(src).model.SerializeToString() == out.SerializeToString()
