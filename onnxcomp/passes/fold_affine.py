"""fold_affine: fold constant per-channel Mul/Add after Conv/ConvTranspose/Gemm/MatMul into weights and bias."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxcomp import ir
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass
from onnxcomp.fusion.affine import (
    LINEAR_OPS,
    Linear,
    LinearOp,
    channel_vector,
    fold_into,
    match_linear,
    split_constant_operand,
)
from onnxcomp.ir import FLOAT_DTYPES, describe, exclusive_reason

log = logging.getLogger(__name__)


@dataclass
class _Match:
    lin: Linear
    scale: np.ndarray
    shift: np.ndarray


@register_pass
class FoldAffine(Pass):
    """Fold ``Mul(y, c)`` and ``Add(y, c)`` with constant per-output-channel ``c`` into ``y``'s producer.

    ``y`` comes from a Conv, ConvTranspose, Gemm, or MatMul with a constant 2-D weight (with or
    without its constant bias Add). A Mul scales the weight per output channel and the bias; an
    Add shifts the bias (created when absent). ``c`` must broadcast along the output-channel axis
    only: scalar, ``(C, 1, 1)`` or ``(1, C, 1, 1)`` for a 2-D Conv; scalar, ``(N,)`` or ``(1, N)``
    for Gemm/MatMul. Chains (Conv -> Mul -> Add) fold repeatedly, to a fixed point.

    An Add right after a bare MatMul is left alone: it already is the MatMul's bias
    (``fuse_matmul_add`` turns the pair into a Gemm). Declines a Mul/Add after one of ``ops`` when
    ``c`` is not per channel (e.g. shape (1, 1, H, W)) or would raise the output's rank, is not a
    float, when the producer's output also feeds another node or a graph output, when the
    producer's weight/bias is not a suitable constant, or when the folded values are not finite.
    """

    name = "fold_affine"
    bodies = True  # also rewrites inside If/Loop/Scan bodies (never across their boundary)

    @dataclass(frozen=True)
    class Options:
        ops: tuple[LinearOp, ...] = LINEAR_OPS  # producers to fold into
        infer_shapes: bool = True  # run shape inference when a MatMul input's rank is unknown

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"mul": 0, "add": 0})
        shapes = ir.Shapes(graph, infer=self.options.infer_shapes)
        swept = True
        while swept:  # each fold removes a node, so this ends
            swept = False
            declined: list[tuple[str, str]] = []
            for node in ir.iter_nodes(graph, ("Mul", "Add")):
                if not node.outputs:
                    continue
                match = self._match(graph, node, shapes)
                if match is None:
                    continue
                reason = (
                    match if isinstance(match, str) else fold_into(graph, match.lin, match.scale, match.shift, node)
                )
                if reason:
                    declined.append((node.name, reason))
                    continue
                assert isinstance(match, _Match)
                result.stats[node.op.lower()] += 1
                result.changed.append(f"{node.name} -> {describe(match.lin.node)}")
                result.modified = swept = True
        for name, reason in declined:  # the last sweep changed nothing: its declines are final
            log.debug("fold_affine: %s declined: %s", name, reason)
        result.declined = declined
        return result

    def _match(self, graph: ir.Graph, node: ir.Node, shapes: ir.Shapes) -> _Match | str | None:
        """What to fold ``node`` into, why it cannot be folded, or None if it is no candidate."""
        split = split_constant_operand(node)
        if split is None:
            return None
        y, const_index = split
        lin = match_linear(graph, y, shapes, tuple(self.options.ops))
        if lin is None:
            return None
        if isinstance(lin, str):
            return lin
        if node.op == "Add" and lin.op == "MatMul" and lin.bias_add is None:
            return None  # this Add is the MatMul's bias
        reason = exclusive_reason(graph, y, node, lin.bias_add or lin.node)
        if reason:
            return reason
        value = ir.constant_value(node.inputs[const_index])
        assert value is not None  # split_constant_operand found it constant
        if value.dtype.name not in FLOAT_DTYPES:
            return f"its constant is {value.dtype.name}, not floating point"
        vec = channel_vector(lin, value)
        if isinstance(vec, str):
            return vec
        if node.op == "Mul":
            return _Match(lin, vec, np.zeros_like(vec))
        return _Match(lin, np.ones_like(vec), vec)
