"""Builders and runners shared by the sparsity tests: small seeded graphs with chosen dead channels.

``Net`` writes graphs node by node. A layer's ``zero`` channels get all-zero weights and bias, so
they output exactly zero; pruning exactly those channels must then leave the outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.api import compress
from onnxcomp.framework.base import PassResult
from onnxcomp.framework.registry import make_pass
from onnxcomp.testing import run_model


class Net:
    """A tiny graph builder with seeded random weights."""

    def __init__(self, seed: int = 0, shape: Sequence[int | str] = ("N", 4, 6, 6)) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shape = list(shape)
        self._count = 0

    def _name(self, base: str) -> str:
        self._count += 1
        return f"{base}{self._count}"

    def const(self, array: Any, name: str | None = None, dtype: Any = np.float32) -> str:
        name = name or self._name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def op(self, op: str, inputs: Sequence[str], name: str | None = None, outputs: int = 1, **attrs: Any) -> str:
        name = name or self._name(op.lower())
        outs = [name] + [f"{name}_out{i}" for i in range(1, outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return name

    def _weight(self, shape: Sequence[int], zero: Iterable[int], axis: int = 0) -> np.ndarray:
        w = self.rng.standard_normal(tuple(shape)) * 0.4
        index = [slice(None)] * len(shape)
        index[axis] = list(zero)
        w[tuple(index)] = 0.0
        return w

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        name: str,
        k: int = 3,
        group: int = 1,
        zero: Iterable[int] = (),
        bias: bool = True,
        **attrs: Any,
    ) -> str:
        zero = list(zero)
        w = self.const(self._weight((cout, cin // group, k, k), zero), f"{name}.w")
        inputs = [x, w]
        if bias:
            b = self.rng.standard_normal(cout) * 0.1
            b[zero] = 0.0
            inputs.append(self.const(b, f"{name}.b"))
        return self.op("Conv", inputs, name=name, group=group, pads=[k // 2] * 4, **attrs)

    def bn(self, x: str, c: int, name: str, zero: Iterable[int] = ()) -> str:
        zero = list(zero)
        mean, beta = self.rng.standard_normal(c) * 0.1, self.rng.standard_normal(c) * 0.1
        mean[zero], beta[zero] = 0.0, 0.0  # BN(0) = 0 on the dead channels
        params = [self.rng.uniform(0.5, 1.5, c), beta, mean, self.rng.uniform(0.5, 1.5, c)]
        names = [self.const(p, f"{name}.{k}") for p, k in zip(params, ("scale", "B", "mean", "var"), strict=True)]
        return self.op("BatchNormalization", [x, *names], name=name)

    def gemm(self, x: str, k: int, n: int, name: str, zero: Iterable[int] = (), trans_b: int = 1) -> str:
        zero = list(zero)
        w = self._weight((n, k) if trans_b else (k, n), zero, axis=0 if trans_b else 1)
        b = self.rng.standard_normal(n) * 0.1
        b[zero] = 0.0
        return self.op("Gemm", [x, self.const(w, f"{name}.w"), self.const(b, f"{name}.b")], name=name, transB=trans_b)

    def matmul(self, x: str, k: int, n: int, name: str, zero: Iterable[int] = ()) -> str:
        return self.op("MatMul", [x, self.const(self._weight((k, n), zero, axis=1), f"{name}.w")], name=name)

    def build(self, outputs: Sequence[str], inputs: Mapping[str, Sequence[int | str]] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "sparsity",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (inputs or {"x": self.shape}).items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(model)
        for out, info in zip(model.graph.output, inferred.graph.output, strict=True):
            out.CopyFrom(info)
        onnx.checker.check_model(model, full_check=True)
        return model


def feeds(model: onnx.ModelProto, n: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    """Random inputs (symbolic dims = ``n``) for every graph input."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else n for d in value.type.tensor_type.shape.dim]
        out[value.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def prune(model: onnx.ModelProto, calibration: Any = None, **options: Any) -> tuple[onnx.ModelProto, PassResult]:
    """Run ``prune_channels`` alone (validated: checker + onnxruntime); the model and the pass result."""
    options.setdefault("refit", calibration is not None)
    report = compress(model, [make_pass("prune_channels", options)], calibration=calibration, batch_size=8)
    return report.model, report.result("prune_channels")


def weight(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    """The constant input ``index`` of a node."""
    node = next(n for n in model.graph.node if n.name == node_name)
    table = {t.name: t for t in model.graph.initializer}
    return numpy_helper.to_array(table[node.input[index]])


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Equal outputs at each onnxruntime optimization level, up to float summation order (the
    removed terms were exact zeros; kernels may sum a shorter reduction in another order)."""
    x = feeds(before)
    for level in ("disable", "all"):
        for got, want in zip(run_model(after, x, level=level), run_model(before, x, level=level), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"at level {level}")


def declined(result: PassResult, node: str) -> str:
    """The decline reason of ``node`` (AssertionError if it was not declined)."""
    reasons = [r for n, r in result.declined if n == node]
    assert reasons, f"{node} not declined: {result.declined}"
    return reasons[0]
