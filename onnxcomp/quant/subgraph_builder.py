"""What the exact activation subgraphs (``quant.activation_subgraphs``, ``quant.hif8_subgraph``)
are built with: named nodes and constants, shared tables, flattened lookups, an in-place |y|."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from onnxcomp import ir

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
HALF_DOWN = float(np.nextafter(np.float32(0.5), np.float32(0)))  # floor(v + this) = RNA(v), v >= 0


class SubgraphBuilder:
    """Small helper: unique names under one prefix, constants, nodes."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix

    def const(self, name: str, value: npt.ArrayLike, dtype: npt.DTypeLike = np.float32) -> ir.Constant:
        return ir.make_constant(ir.unique_name(self.graph, f"{self.prefix}_{name}"), np.asarray(value, dtype))

    def shared(self, name: str, value: np.ndarray) -> ir.Tensor:
        """A table constant shared by every subgraph of the graph (same name, created once)."""
        cache: dict[str, ir.Tensor] = self.graph.__dict__.setdefault("_onnxcomp_act_tables", {})
        if name not in cache:
            tensors = self.graph.tensors()
            cache[name] = (
                tensors[name] if name in tensors else ir.make_constant(ir.unique_name(self.graph, name), value)
            )
        return cache[name]

    def op(self, op: str, inputs: list[ir.Tensor], name: str, attrs: dict | None = None) -> ir.Variable:
        out = ir.make_variable(self.graph, f"{self.prefix}_{name}")
        ir.make_node(self.graph, op, inputs, [out], f"{self.prefix}_{name}", attrs)
        return out

    def reduce_max(self, x: ir.Tensor, name: str, axis: int = -1) -> ir.Variable:
        return self.reduce("ReduceMax", x, name, axis)

    def reduce(self, op: str, x: ir.Tensor, name: str, axis: int = -1) -> ir.Variable:
        """ReduceMax / ReduceMin over one axis, keeping it (axes an input from opset 18)."""
        if ir.default_opset(self.graph) >= 18:
            return self.op(op, [x, self.const("axes", [axis], np.int64)], name, {"keepdims": 1})
        return self.op(op, [x], name, {"axes": [axis], "keepdims": 1})

    def lookup(self, table: ir.Tensor, index: ir.Tensor, like: ir.Tensor, name: str) -> ir.Variable:
        """``table[index]`` elementwise, shaped like ``like``: GatherElements on flattened views.

        (Gather does the same but costs ~8x more per element in onnxruntime's CPU provider.)
        """
        flat = self.op("Reshape", [index, self.const("flat", [-1], np.int64)], f"{name}_flat_index")
        values = self.op("GatherElements", [table, flat], f"{name}_flat", {"axis": 0})
        return self.op("Reshape", [values, self.op("Shape", [like], f"{name}_shape")], name)


def abs_in_place(b: SubgraphBuilder, y: ir.Tensor) -> ir.Variable:
    """|y| as LeakyRelu(alpha=-1), which onnxruntime computes in place (Abs is not); -0 stays -0."""
    return b.op("LeakyRelu", [y], "abs", {"alpha": -1.0})
