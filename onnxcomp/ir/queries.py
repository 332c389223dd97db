"""Graph queries every layer above shares: one place for each of them.

* naming nodes in messages (:func:`describe`) and in records (:func:`node_key`);
* "the constant float weight of a node, or why not" (:func:`float_weight`);
* tensor shapes and ranks on demand, with onnx shape inference run at most once (:class:`Shapes`);
* small constant folding through shape ops and casts (:func:`folded_value`);
* where the output channels and the reduction axis of a weight are (:func:`weight_layout`);
* skip-list matching of node names against globs (:func:`match_glob`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from onnx import helper

from onnxcomp.errors import ConfigError
from onnxcomp.ir.graph import (
    Graph,
    Node,
    Tensor,
    constant_value,
    consumers,
    infer_shapes,
    is_graph_output,
    producer,
)

#: Element types that count as floating point for weights and affine constants.
FLOAT_DTYPES: frozenset[str] = frozenset({"float16", "float32", "float64", "bfloat16"})


def is_onnx_op(node: Node) -> bool:
    """True for an operator of the default (ai.onnx) domain."""
    return node.domain in (None, "", "ai.onnx")


def describe(node: Node) -> str:
    """``Conv 'name'`` (or ``Conv writing 'tensor'`` for an unnamed node) for messages."""
    if node.name or not node.outputs:
        return f"{node.op} {node.name!r}"
    return f"{node.op} writing {node.outputs[0].name!r}"


def node_key(node: Node) -> str:
    """A node's name, or its first output's name for an unnamed node (records are keyed by it)."""
    return node.name or (node.outputs[0].name if node.outputs else "")


def exclusive_reason(graph: Graph, tensor: Tensor, node: Node, owner: Node) -> str | None:
    """Why ``tensor`` (``owner``'s output) does not feed only ``node``, or None if it does."""
    if is_graph_output(graph, tensor):
        return f"the output of {describe(owner)} is a graph output"
    others = [n.name or n.op for n in consumers(tensor) if n is not node]
    if others:
        return f"the output of {describe(owner)} also feeds {', '.join(sorted(others))}"
    return None


def float_weight(node: Node, index: int, what: str) -> np.ndarray | str:
    """The constant floating-point input ``index`` of ``node``, or why it is not one."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return f"{describe(node)} has no {what}"
    value = constant_value(node.inputs[index])
    if value is None:
        return f"the {what} {node.inputs[index].name!r} of {describe(node)} is not a constant"
    if value.dtype.name not in FLOAT_DTYPES:
        return f"the {what} {node.inputs[index].name!r} of {describe(node)} is {value.dtype.name}, not floating point"
    return value


def match_glob(name: str, patterns: Iterable[str]) -> str | None:
    """The first glob of ``patterns`` matching ``name`` (None if none does).

    Every skip list and name override of every pass matches node names through this function.
    """
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


# --- weight axes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightLayout:
    """Where the output channels and the reduction (input) axis of a weight are."""

    channel_axis: int
    reduction_axis: int


def weight_layout(op: str, rank: int, trans_b: bool = False) -> WeightLayout:
    """Axes of a weight by op (``docs/formats.md#granularity-量化粒度``: ONNX layouts)."""
    if op == "Conv":
        return WeightLayout(0, 1)  # (Cout, Cin/g, k...)
    if op == "ConvTranspose":
        return WeightLayout(1, 0)  # (Cin, Cout/g, k...)
    if op == "Gemm":
        return WeightLayout(0, 1) if trans_b else WeightLayout(1, 0)
    if op == "MatMul":
        return WeightLayout(rank - 1, rank - 2)  # (..., K, N)
    raise ConfigError(f"no weight layout for op {op!r}")


def reduction_axis(op: str, ndim: int, trans_b: bool = False) -> int:
    """The input-channel (reduction) axis of a weight: Cin for Conv, K for Gemm/MatMul."""
    return weight_layout(op, ndim, trans_b).reduction_axis


# --- shapes and small constant folding -----------------------------------------------------


class Shapes:
    """Tensor ranks and dims from shape info; runs :func:`infer_shapes` at most once, on demand.

    With ``infer=False`` only the shape information already in the graph is used.
    """

    def __init__(self, graph: Graph, infer: bool = True) -> None:
        self.graph = graph
        self.infer = infer
        self._inferred = False

    def shape(self, tensor: Tensor) -> list[int | str | None] | None:
        value = folded_value(tensor)
        if value is not None:
            return list(value.shape)
        if tensor.shape is None and self.infer and not self._inferred:
            self._inferred = True
            infer_shapes(self.graph)
        return None if tensor.shape is None else list(tensor.shape)

    def rank(self, tensor: Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def dim(self, tensor: Tensor, axis: int) -> int | None:
        """A static dim (None when unknown or symbolic)."""
        shape = self.shape(tensor)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        value = shape[axis]
        return value if isinstance(value, int) and value >= 0 else None


def int_list(tensor: Tensor | None) -> list[int] | None:
    """The values of a constant integer tensor as a list (None when absent or not constant)."""
    if tensor is None or not tensor.name:
        return None
    value = folded_value(tensor)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def raw_axes(node: Node) -> list[int] | None:
    """The ``axes`` of a node as written (attribute, or input 1 at newer opsets); None if absent."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    return int_list(node.inputs[1]) if len(node.inputs) > 1 else None


def node_axes(node: Node, rank: int) -> list[int] | None:
    """Sorted non-negative ``axes`` of a node for an input (Unsqueeze: output) of ``rank``."""
    axes = raw_axes(node)
    return None if axes is None else sorted(a % rank for a in axes)


_FOLDABLE = ("Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Flatten")


def folded_value(tensor: Tensor, depth: int = 0) -> np.ndarray | None:
    """The value of a constant, or of a short chain of shape ops/casts over constants (else None)."""
    value = constant_value(tensor)
    if value is not None or depth > 8:
        return value
    node = producer(tensor)
    if node is None or node.op not in _FOLDABLE or not is_onnx_op(node):
        return None
    x = folded_value(node.inputs[0], depth + 1) if node.inputs else None
    if x is None:
        return None
    if node.op == "Identity":
        return x
    if node.op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    if node.op == "Reshape":
        shape = int_list(node.inputs[1]) if len(node.inputs) > 1 else None
        if shape is None or node.attrs.get("allowzero", 0):
            return None
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])
    if node.op == "Unsqueeze":
        axes = raw_axes(node)
        return None if axes is None else np.expand_dims(x, tuple(node_axes(node, x.ndim + len(axes)) or ()))
    axes = node_axes(node, x.ndim)
    if axes is None:
        return np.squeeze(x) if len(node.inputs) < 2 or not node.inputs[1].name else None
    return np.squeeze(x, tuple(axes))
