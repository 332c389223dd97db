"""Builders and runners shared by the decomposition tests (small seeded models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.analysis.macs import model_macs
from onnxcomp.framework.base import PassContext, PassResult
from onnxcomp.framework.manager import PassManager, RunReport
from onnxcomp.framework.registry import make_pass

#: Options that turn every policy rule off: only structural declines remain.
PERMISSIVE: dict[str, Any] = {
    "align": 1,
    "require_saving": False,
    "min_channels": 0,
    "min_kernel_channels": 0,
}
CONV_PERMISSIVE: dict[str, Any] = {**PERMISSIVE, "allow_dilation": True, "max_stride": 8, "min_kernel": 1}
FULL_RANK = "rank:100000"  # capped at the number of singular values


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: dict[str, Sequence[int | str]],
    inits: Sequence[onnx.TensorProto],
    outputs: Sequence[str] = ("y",),
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "decomp",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)  # graph outputs need a shape for the checker
    for out, info in zip(model.graph.output, inferred.graph.output, strict=True):
        out.CopyFrom(info)
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(
    cin: int = 4,
    cout: int = 6,
    kernel: tuple[int, int] = (3, 3),
    hw: tuple[int, int] = (10, 11),
    bias: bool = True,
    seed: int = 0,
    group: int = 1,
    batch: int | str = "N",
    weight: np.ndarray | None = None,
    **attrs: Any,
) -> onnx.ModelProto:
    """x[batch, cin, H, W] -> Conv(cout, kernel, **attrs) -> y."""
    r = np.random.default_rng(seed)
    w = weight if weight is not None else r.standard_normal((cout, cin // group, *kernel)) * 0.3
    inits = [numpy_helper.from_array(np.asarray(w, np.float32), "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array((r.standard_normal(cout) * 0.1).astype(np.float32), "b"))
        ins.append("b")
    node = helper.make_node("Conv", ins, ["y"], name="conv", group=group, **attrs)
    return make_model([node], {"x": [batch, cin, *hw]}, inits)


def run_pass(
    model: onnx.ModelProto, name: str = "decompose_conv", calibration: Any = None, **options: Any
) -> tuple[RunReport, PassResult]:
    """Run one decomposition pass through a PassManager (validating the result)."""
    ctx = PassContext()
    if calibration is not None:
        batches = list(calibration)
        ctx.calibration = lambda: iter(batches)
        ctx.calibration_name = "test batches"
    report = PassManager([make_pass(name, options)]).run(model, ctx)
    return report, report.result(name)


def conv_macs(model: onnx.ModelProto) -> int:
    macs = [m.macs for m in model_macs(model) if m.op == "Conv"]
    assert all(m is not None for m in macs)
    return int(sum(m for m in macs if m is not None))


def smooth_batches(shape: Sequence[int], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Correlated, positive (post-ReLU-like) activations: blurred noise, like real feature maps."""
    r = np.random.default_rng(seed)
    axis = 1 if len(shape) == 4 else len(shape) - 1  # channels of a feature map, features of a row
    mix = np.random.default_rng(1234).standard_normal((shape[axis], shape[axis])) * 0.5 + np.eye(shape[axis])
    out = []
    for _ in range(n):
        x = r.standard_normal(tuple(shape))
        for ax in (-1, -2):
            x = (x + np.roll(x, 1, ax) + np.roll(x, -1, ax)) / 3.0
        x = np.moveaxis(np.moveaxis(x, axis, -1) @ mix, -1, axis)
        out.append({"x": np.maximum(x, 0.0).astype(np.float32)})
    return out
