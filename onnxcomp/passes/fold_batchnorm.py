"""fold_batchnorm: fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from onnxcomp import ir
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass
from onnxcomp.fusion.affine import (
    LINEAR_OPS,
    Linear,
    LinearOp,
    batchnorm_affine,
    fold_into,
    match_linear,
)
from onnxcomp.ir import describe, exclusive_reason

log = logging.getLogger(__name__)


def _producer_reason(tensor: ir.Tensor, ops: tuple[str, ...]) -> str:
    node = ir.producer(tensor)
    source = f"produced by {describe(node)}" if node is not None else "a graph input or constant"
    return f"its input is {source}, not by one of {', '.join(ops)}"


def _layout_reason(lin: Linear, channels: int) -> str | None:
    """Why BatchNormalization's channel axis (1) is not ``lin``'s output-channel axis, or None."""
    if lin.op == "MatMul":
        if lin.out_rank is None:
            return f"the rank of {describe(lin.node)}'s output is unknown (BatchNormalization needs axis 1 = channels)"
        if lin.out_rank != 2:
            return (
                f"{describe(lin.node)}'s output is {lin.out_rank}-D: BatchNormalization normalizes axis 1, "
                "the MatMul's channels are on the last axis"
            )
    if channels != lin.channels:
        return f"it has {channels} channels but {describe(lin.node)} produces {lin.channels}"
    return None


@register_pass
class FoldBatchNorm(Pass):
    """Fold inference-mode BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

    With ``a = scale / sqrt(var + eps)`` per channel, the producer's weight is scaled per OUTPUT
    channel (``W' = W*a``) and its bias becomes ``b' = (b - mean)*a + B`` (created when absent:
    Conv/ConvTranspose input B, Gemm input C with ``beta=1``, an ``Add`` after a bare MatMul).
    Grouped ConvTranspose, Gemm ``transB``/``alpha``/``beta`` and a MatMul followed by a constant
    bias ``Add`` are handled. Shared weights/biases get fresh constants; other readers are untouched.

    Declines a BatchNormalization when: it is in training form (``training_mode=1`` or running
    statistics outputs); a parameter is not constant; its input is not produced by one of ``ops``
    or also feeds another node or a graph output; the producer's weight/bias is not a float
    constant or its bias does not broadcast per channel (e.g. a Gemm C of shape (M, N)); a MatMul
    output is not 2-D (BatchNormalization's axis 1 would not be the MatMul's channel axis, or the
    rank is unknown); or the folded values are not finite.
    """

    name = "fold_batchnorm"
    bodies = True  # also rewrites inside If/Loop/Scan bodies (never across their boundary)

    @dataclass(frozen=True)
    class Options:
        ops: tuple[LinearOp, ...] = LINEAR_OPS  # producers to fold into
        infer_shapes: bool = True  # run shape inference when a MatMul input's rank is unknown

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"folded": 0})
        shapes = ir.Shapes(graph, infer=self.options.infer_shapes)
        for node in ir.iter_nodes(graph, ("BatchNormalization",)):
            outcome = self._try_fold(graph, node, shapes)
            if isinstance(outcome, str):
                result.declined.append((node.name, outcome))
                log.debug("fold_batchnorm: %s declined: %s", node.name, outcome)
                continue
            result.stats["folded"] += 1
            result.changed.append(f"{node.name} -> {describe(outcome.node)}")
            result.modified = True
        return result

    def _try_fold(self, graph: ir.Graph, bn: ir.Node, shapes: ir.Shapes) -> Linear | str:
        """The producer ``bn`` was folded into, or why it was declined."""
        affine = batchnorm_affine(bn)
        if isinstance(affine, str):
            return affine
        scale, shift = affine
        x = bn.inputs[0]
        ops = tuple(self.options.ops)
        lin = match_linear(graph, x, shapes, ops)
        if lin is None:
            return _producer_reason(x, ops)
        if isinstance(lin, str):
            return lin
        reason = exclusive_reason(graph, x, bn, lin.bias_add or lin.node) or _layout_reason(lin, scale.shape[0])
        reason = reason or fold_into(graph, lin, scale, shift, bn)
        return reason or lin
