"""lower_batchnorm: rewrite inference BatchNormalization as Mul + Add with constant per-channel tensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxcomp import ir
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass
from onnxcomp.fusion.affine import batchnorm_affine
from onnxcomp.ir import FLOAT_DTYPES

log = logging.getLogger(__name__)


def _value_dtype(tensor: ir.Tensor) -> np.dtype | None:
    """The numpy dtype of ``tensor``, or None when unknown or not a numpy type."""
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        return None


@register_pass
class LowerBatchNorm(Pass):
    """Replace each remaining inference BatchNormalization by ``Mul(x, a) + t``.

    ``a = scale / sqrt(var + eps)`` and ``t = B - mean*a`` become constants of shape
    ``(C, 1, ..., 1)`` for the input's rank, in the input's dtype. Run it after ``fold_batchnorm``
    for the BatchNormalizations that could not be folded (e.g. after a Relu).

    Declines a BatchNormalization in training form (``training_mode=1`` or running-statistics
    outputs), with a non-constant parameter, whose input rank or dtype is unknown (no shape
    information, even after shape inference), whose input rank is below 2, or whose constants are
    not finite in the input dtype.
    """

    name = "lower_batchnorm"
    bodies = True  # also rewrites inside If/Loop/Scan bodies (never across their boundary)

    @dataclass(frozen=True)
    class Options:
        infer_shapes: bool = True  # run shape inference when an input's rank is unknown

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"lowered": 0})
        shapes = ir.Shapes(graph, infer=self.options.infer_shapes)
        for node in ir.iter_nodes(graph, ("BatchNormalization",)):
            reason = self._try_lower(graph, node, shapes)
            if reason:
                result.declined.append((node.name, reason))
                log.debug("lower_batchnorm: %s declined: %s", node.name, reason)
                continue
            result.stats["lowered"] += 1
            result.changed.append(node.name)
            result.modified = True
        return result

    def _try_lower(self, graph: ir.Graph, bn: ir.Node, shapes: ir.Shapes) -> str | None:
        """Lower ``bn``; the reason it was declined, or None."""
        affine = batchnorm_affine(bn)
        if isinstance(affine, str):
            return affine
        x = bn.inputs[0]
        rank = shapes.rank(x)
        if rank is None:
            return f"the rank of its input {x.name!r} is unknown (no shape information)"
        if rank < 2:
            return f"its input {x.name!r} is {rank}-D, expected (N, C, ...)"
        dtype = _value_dtype(x)
        if dtype is None or dtype.name not in FLOAT_DTYPES:
            return f"the dtype of its input {x.name!r} is unknown or not floating point"
        shape = (-1,) + (1,) * (rank - 2)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below
            scale, shift = (v.reshape(shape).astype(dtype) for v in affine)
        if not (np.isfinite(scale.astype(np.float64)).all() and np.isfinite(shift.astype(np.float64)).all()):
            return f"its scale/shift are not finite in {dtype.name}"

        out = bn.outputs[0]
        bn.inputs.clear()
        bn.outputs.clear()
        base = bn.name or "BatchNormalization"
        scaled = ir.make_variable(graph, f"{out.name}_scaled", dtype=out.dtype, shape=out.shape)
        scale_const = ir.make_constant(ir.unique_name(graph, f"{base}_scale"), scale)
        shift_const = ir.make_constant(ir.unique_name(graph, f"{base}_shift"), shift)
        ir.make_node(graph, "Mul", [x, scale_const], [scaled], name=f"{base}_mul")
        ir.make_node(graph, "Add", [scaled, shift_const], [out], name=f"{base}_add")
        return None
