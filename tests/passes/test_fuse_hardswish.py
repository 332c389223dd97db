"""fuse_hardswish: x * Clip(x + 3, 0, 6) / 6 -> x * HardSigmoid(x)."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_models import check_pass, counts, init, model
from onnx import helper


def _hardswish(last: str = "Div", swap: bool = False, clip_attrs: bool = False, extra_reader: bool = False):  # noqa: ANN202
    inits = [init("three", np.float32(3)), init("six", np.float32(6)), init("sixth", np.float32(1 / 6))]
    add_in = ["three", "x"] if swap else ["x", "three"]
    nodes = [helper.make_node("Add", add_in, ["a"], name="add")]
    if clip_attrs:
        nodes.append(helper.make_node("Clip", ["a"], ["c"], name="clip", min=0.0, max=6.0))
    else:
        inits += [init("lo", np.float32(0)), init("hi", np.float32(6))]
        nodes.append(helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="clip"))
    nodes.append(helper.make_node("Mul", ["c", "x"] if swap else ["x", "c"], ["m"], name="mul"))
    nodes.append(helper.make_node(last, ["m", "six" if last == "Div" else "sixth"], ["y"], name="last"))
    outputs = {"y": ["N", 8]}
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["c"], ["z"], name="other"))
        outputs["z"] = ["N", 8]
    return model(nodes, {"x": ["N", 8]}, outputs, inits, opset=10 if clip_attrs else 17)


@pytest.mark.parametrize(
    "variant", [{}, {"swap": True}, {"last": "Mul"}, {"clip_attrs": True}], ids=["div", "swapped", "mul", "opset10"]
)
def test_hardswish_becomes_hardsigmoid_mul(variant: dict) -> None:
    fused, result = check_pass(_hardswish(**variant), "fuse_hardswish", rtol=1e-6, atol=1e-6)
    assert counts(fused) == {"HardSigmoid": 1, "Mul": 1} and result.stats == {"hardswish": 1}


def test_shared_intermediate_is_left_alone() -> None:
    fused, result = check_pass(_hardswish(extra_reader=True), "fuse_hardswish", modified=False)
    assert counts(fused)["Clip"] == 1 and not result.changed
