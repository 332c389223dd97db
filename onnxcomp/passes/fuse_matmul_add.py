"""fuse_matmul_add: MatMul with a constant 2-D weight followed by a constant bias Add -> one Gemm."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from onnxcomp import ir
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass
from onnxcomp.fusion.affine import split_constant_operand
from onnxcomp.ir import FLOAT_DTYPES, describe, exclusive_reason, is_onnx_op

log = logging.getLogger(__name__)


@register_pass
class FuseMatMulAdd(Pass):
    """Rewrite ``Add(MatMul(X, W), b)`` as ``Gemm(X, W, b)`` when X is 2-D.

    ``W`` is a constant 2-D float ``(K, N)`` and ``b`` a constant of shape ``(N,)``, ``(1, N)`` or
    a scalar, with W's dtype. The MatMul node becomes the Gemm (its name is kept) and writes the
    Add's output tensor, so the output name is kept too.

    Declines a MatMul+Add when X's rank is unknown (no shape information, even after shape
    inference) or is not 2 (Gemm is 2-D only), when W is not a constant 2-D float, when ``b`` does
    not broadcast per column or has another dtype, or when the MatMul's output also feeds another
    node or is a graph output.
    """

    name = "fuse_matmul_add"
    bodies = True  # also rewrites inside If/Loop/Scan bodies (never across their boundary)

    @dataclass(frozen=True)
    class Options:
        infer_shapes: bool = True  # run shape inference when X's rank is unknown

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"fused": 0})
        shapes = ir.Shapes(graph, infer=self.options.infer_shapes)
        for add in ir.iter_nodes(graph, ("Add",)):
            split = split_constant_operand(add)
            matmul = ir.producer(split[0]) if split is not None else None
            if split is None or matmul is None or matmul.op != "MatMul":
                continue
            if not (is_onnx_op(matmul) and is_onnx_op(add)):
                continue
            reason = self._try_fuse(graph, matmul, add, split[1], shapes)
            if reason:
                result.declined.append((add.name, reason))
                log.debug("fuse_matmul_add: %s declined: %s", add.name, reason)
                continue
            result.stats["fused"] += 1
            result.changed.append(f"{matmul.name} + {add.name} -> Gemm")
            result.modified = True
        return result

    def _try_fuse(
        self, graph: ir.Graph, matmul: ir.Node, add: ir.Node, bias_index: int, shapes: ir.Shapes
    ) -> str | None:
        """Fuse the pair; the reason it was declined, or None."""
        x, w = matmul.inputs[0], matmul.inputs[1]
        bias = add.inputs[bias_index]
        reason = exclusive_reason(graph, matmul.outputs[0], add, matmul)
        if reason:
            return reason
        weight = ir.constant_value(w)
        if weight is None or weight.ndim != 2 or weight.dtype.name not in FLOAT_DTYPES:
            return f"the weight of {describe(matmul)} is not a constant 2-D float"
        value = ir.constant_value(bias)
        assert value is not None  # split_constant_operand found it constant
        n = weight.shape[1]
        if value.ndim > 2 or any(d != 1 for d in value.shape[:-1]) or (value.ndim and value.shape[-1] not in (1, n)):
            return f"the bias {bias.name!r} has shape {value.shape}, not ({n},), (1, {n}) or a scalar"
        if value.dtype != weight.dtype:
            return f"the bias {bias.name!r} is {value.dtype.name} but the weight is {weight.dtype.name}"
        rank = shapes.rank(x)
        if rank is None:
            return f"the rank of {describe(matmul)}'s input {x.name!r} is unknown (no shape information)"
        if rank != 2:
            return f"{describe(matmul)}'s input {x.name!r} is {rank}-D; Gemm needs 2-D"

        out = add.outputs[0]
        add.inputs.clear()
        add.outputs.clear()
        matmul.op = "Gemm"
        matmul.inputs.append(bias)
        matmul.outputs[0] = out
        return None
