"""Graph queries every layer above shares: one place for each of them.

* naming nodes in messages (:func:`describe`) and in records (:func:`node_key`);
* (the constant float weight of a node, or why not, is :mod:`onnxcomp.ir.constants`);
* tensor shapes and ranks on demand, with onnx shape inference run at most once (:class:`Shapes`);
* where the output channels and the reduction axis of a weight are (:func:`weight_layout`);
* skip-list matching of node names against globs (:func:`match_glob`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from onnxcomp.errors import ConfigError
from onnxcomp.ir.constants import describe, folded_value
from onnxcomp.ir.graph import (
    Graph,
    Node,
    Tensor,
    consumers,
    infer_shapes,
    is_graph_output,
    owns,
)


def node_key(node: Node) -> str:
    """A node's name, or its first output's name for an unnamed node (records are keyed by it)."""
    return node.name or (node.outputs[0].name if node.outputs else "")


def exclusive_reason(graph: Graph, tensor: Tensor, node: Node, owner: Node) -> str | None:
    """Why ``tensor`` (``owner``'s output) does not feed only ``node``, or None if it does."""
    if not owns(graph, owner):  # a rewrite inside an If/Loop body must not reach into its parent
        return f"{describe(owner)} is outside the subgraph of {describe(node)}"
    if is_graph_output(graph, tensor):
        return f"the output of {describe(owner)} is a graph output"
    others = [n.name or n.op for n in consumers(tensor) if n is not node]
    if others:
        return f"the output of {describe(owner)} also feeds {', '.join(sorted(others))}"
    return None


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


# --- shapes -----------------------------------------------------------------------------------


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
