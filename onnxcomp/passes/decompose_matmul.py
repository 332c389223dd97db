"""decompose_matmul: low-rank factorisation W ~= A @ B of constant Gemm/MatMul weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxcomp import ir
from onnxcomp.decomposition.driver import (
    DecomposeOptions,
    Decomposer,
    Target,
    run_decomposition,
    too_small,
)
from onnxcomp.decomposition.refit import MatMulRows, Probe
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass
from onnxcomp.ir import float_weight, is_onnx_op


def _rows(node: ir.Node, shape: Sequence[int | str | None] | None) -> tuple[int, bool]:
    """(rows of the product, known?) from the A operand's shape; symbolic dims count as 1 (as in
    ``onnxcomp.macs``), an unknown shape gives per-row counts."""
    if shape is None or not len(shape):
        return 1, False
    if node.op == "Gemm":
        lead = [shape[1] if node.attrs.get("transA", 0) else shape[0]]
    else:
        lead = list(shape[:-1])
    return math.prod(d if isinstance(d, int) and d > 0 else 1 for d in lead), True


class _MatMulDecomposer(Decomposer):
    pass_name = "decompose_matmul"
    ops = ("Gemm", "MatMul")

    def match(self, graph: ir.Graph, node: ir.Node) -> Target | str:
        if not is_onnx_op(node):
            return f"it is in domain {node.domain!r}, not ai.onnx"
        weight = float_weight(node, 1, "B operand")
        if isinstance(weight, str):
            return weight
        if ir.is_constant(node.inputs[0]):
            return "its A operand is a constant too (nothing to run at inference)"
        if weight.ndim != 2:
            return f"its B operand is {weight.ndim}-D, not 2-D"
        matrix = weight.astype(np.float64)
        if node.op == "Gemm":
            if node.attrs.get("transB", 0):
                matrix = matrix.T
            matrix = matrix * float(node.attrs.get("alpha", 1.0))
        k, n = matrix.shape
        rows, exact = _rows(node, self.known_shape(graph, node.inputs[0]))
        return Target(node, weight, matrix, 1, min(k, n), rows * k * n, rows * (k + n), exact)

    def policy(self, target: Target) -> str | None:
        return too_small(self.options, target.kernel, target.channels)

    def factor_shapes(self, target: Target, rank: int) -> list[list[int]]:
        k, n = target.matrix.shape
        return [[k, rank], [rank, n]]

    def probe(self, target: Target, first: np.ndarray, second: np.ndarray, index: int) -> Probe:
        a = first.astype(target.weight.dtype).astype(np.float64)
        trans_a = target.node.op == "Gemm" and bool(target.node.attrs.get("transA", 0))
        rows = MatMulRows(a, target.matrix, trans_a)  # picklable: sharded calibration sends it to workers
        return Probe((target.node.inputs[0].name,), rows, second, intercept=False)

    def from_solution(self, target: Target, solution: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return solution, None

    def emit(
        self, graph: ir.Graph, target: Target, first: np.ndarray, second: np.ndarray, bias: np.ndarray | None
    ) -> list[str]:
        node = target.node
        base = node.name or node.outputs[0].name
        dtype = target.weight.dtype
        wname = node.inputs[1].name
        c1 = ir.make_constant(ir.unique_name(graph, f"{wname}_down"), first.astype(dtype))
        c2 = ir.make_constant(ir.unique_name(graph, f"{wname}_up"), second.astype(dtype))
        x, out = node.inputs[0], node.outputs[0]
        z = ir.make_variable(graph, f"{base}_down_out", dtype=dtype)
        if node.op == "MatMul":
            n1 = ir.make_node(graph, "MatMul", [x, c1], [z], name=f"{base}_down")
            n2 = ir.make_node(graph, "MatMul", [z, c2], [out], name=f"{base}_up")
        else:
            old_c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            needs_c = ir.default_opset(graph) < 11  # C became optional in opset 11
            in1: list[ir.Tensor] = [x, c1]
            if needs_c:
                zero = np.zeros(first.shape[1], dtype)
                in1.append(ir.make_constant(ir.unique_name(graph, f"{base}_down_zero"), zero))
            attrs1 = {"transA": int(node.attrs.get("transA", 0))}
            attrs2 = {"beta": float(node.attrs.get("beta", 1.0))}
            n1 = ir.make_node(graph, "Gemm", in1, [z], name=f"{base}_down", attrs=attrs1)
            n2 = ir.make_node(
                graph, "Gemm", [z, c2, *([old_c] if old_c is not None else [])], [out], name=f"{base}_up", attrs=attrs2
            )
        node.inputs.clear()
        node.outputs.clear()
        return [n1.name, n2.name]


@register_pass
class DecomposeMatMul(Pass):
    """Factor the constant 2-D weight of a Gemm or MatMul as W ~= A @ B (rank r), emitting two nodes.

    ``MatMul(X, W)`` becomes ``MatMul(MatMul(X, A), B)``; ``Gemm(X, W, C)`` becomes
    ``Gemm(Gemm(X, A, transA), B, C, beta)`` with ``alpha`` and ``transB`` folded into the
    factors. The rank rules, alignment, record/replay and data-aware refit of ``B`` are those of
    ``decompose_conv`` (with kernel 1: the "too small" rule then declines ``min(K, N) < 64`` by
    default). Declines nodes outside ai.onnx, with a non-constant, non-float or non-2-D weight,
    with a constant A operand, "too small" ones, and ranks that would not save MACs.
    """

    name = "decompose_matmul"
    keeps_outputs_close = False  # removes capacity at a chosen ratio: validation checks shapes, not values

    @dataclass(frozen=True)
    class Options(DecomposeOptions):
        pass

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = run_decomposition(graph, ctx, _MatMulDecomposer(self.options))
        for node, where in ir.body_nodes(graph, ("MatMul", "Gemm")):
            result.declined.append((node.name, f"{where}: layers are decomposed in the main graph only"))
        return result
