"""Builders and checks shared by the fusion-pass tests (synthetic graphs with random weights)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.framework.base import PassResult
from onnxcomp.framework.manager import PassManager, RunReport
from onnxcomp.framework.registry import make_pass
from onnxcomp.testing import assert_numerically_equal, op_counts, random_feeds

OPSET = 17
_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def init(name: str, array: Any, dtype: Any = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name=name)


def randn(r: np.random.Generator, name: str, shape: Sequence[int], dtype: Any = np.float32) -> TensorProto:
    return init(name, r.standard_normal(tuple(shape)), dtype)


def bn_params(r: np.random.Generator, prefix: str, channels: int, dtype: Any = np.float32) -> list[TensorProto]:
    """scale, B, mean, var initializers (var = |randn| + 0.1)."""
    return [
        init(f"{prefix}_scale", r.standard_normal(channels), dtype),
        init(f"{prefix}_B", r.standard_normal(channels), dtype),
        init(f"{prefix}_mean", r.standard_normal(channels), dtype),
        init(f"{prefix}_var", np.abs(r.standard_normal(channels)) + 0.1, dtype),
    ]


def bn_node(x: str, y: str, prefix: str, **attrs: Any) -> onnx.NodeProto:
    names = [f"{prefix}_{p}" for p in ("scale", "B", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=prefix, **attrs)


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, Sequence[int | str] | None],
    outputs: Mapping[str, Sequence[int | str]],
    inits: Sequence[TensorProto],
    dtype: Any = np.float32,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """A checked model; ``outputs`` need shapes (onnx.checker's full check wants them)."""
    elem = _ELEM[np.dtype(dtype)]
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, elem, s) for n, s in outputs.items()],
        list(inits),
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m, full_check=True)
    return m


def run(model_: onnx.ModelProto, *names: str, **options: Any) -> RunReport:
    """Run the named passes (options apply to every pass) through a PassManager."""
    return PassManager([make_pass(n, options or None) for n in names]).run(model_)


def check_pass(
    model_: onnx.ModelProto,
    name: str,
    modified: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    **options: Any,
) -> tuple[onnx.ModelProto, PassResult]:
    """Run one pass and check numerics, ``modified``, idempotence and determinism."""
    before = model_.SerializeToString()
    report = run(model_, name, **options)
    result = report.result(name)
    assert result.modified is modified, (result.summary(), result.declined)
    assert model_.SerializeToString() == before, "the input model was modified"
    assert_numerically_equal(model_, report.model, random_feeds(model_, seed=1), rtol=rtol, atol=atol)
    again = run(report.model, name, **options)
    assert again.result(name).modified is False, again.result(name).changed
    assert run(model_, name, **options).model.SerializeToString() == report.model.SerializeToString()
    return report.model, result


def counts(model_: onnx.ModelProto) -> dict[str, int]:
    return op_counts(model_)


def initializer(model_: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model_.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)
