"""sparsify_2to4: n:m structured sparsity (2:4 by default) along the input-channel axis of weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from onnxcomp import ir
from onnxcomp.errors import ConfigError, RecipeError
from onnxcomp.formats.nm import NMPattern, apply_nm, nm_fraction, parse_pattern
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass
from onnxcomp.ir import match_glob, reduction_axis
from onnxcomp.sparsity import record
from onnxcomp.sparsity.coupling import float_weight

log = logging.getLogger(__name__)

WeightOp = Literal["Conv", "ConvTranspose", "Gemm", "MatMul"]


@register_pass
class Sparsify2to4(Pass):
    """Zero all but the ``n`` largest-magnitude weights of every ``m`` along the input-channel axis.

    The axis is Cin for Conv (at every ``(cout, kh, kw)``; Cin for ConvTranspose too) and K for
    Gemm (``transB`` aware) and MatMul with a constant weight. An axis whose length is not a
    multiple of ``m`` is zero-padded for the selection; an axis of length ``<= n`` is left alone.
    The weight keeps its shape, so nothing around it changes. Shared weights get their own copy.
    Every sparsified weight satisfies the pattern on 100 % of its groups (``stats``).

    Declines a layer whose weight is not a float constant (MatMul: not the second input), whose
    input-channel axis has length ``<= n``, that matches ``skip``, or that ``prune_channels``
    pruned earlier in the same run (one kind of sparsity per layer). Already n:m-sparse weights
    are counted as ``already`` and left as they are.
    """

    name = "sparsify_2to4"

    @dataclass(frozen=True)
    class Options:
        pattern: str = "2:4"  # n:m (keep n of every m)
        ops: tuple[WeightOp, ...] = ("Conv", "Gemm", "MatMul")
        skip: tuple[str, ...] = ()  # node-name globs left dense

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        try:
            self.pattern: NMPattern = parse_pattern(self.options.pattern)
        except ConfigError as exc:
            raise RecipeError(f"sparsify_2to4.pattern: {exc}") from exc

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"layers": 0, "already": 0, "zeroed": 0, "groups": 0, "groups_ok": 0})
        pruned = record.layers_of_kind(ctx, "channels")
        entries = []
        for node in ir.iter_nodes(graph, self.options.ops):
            reason, weight, axis = self._check(node, pruned)
            if reason:
                result.declined.append((node.name, reason))
                log.debug("sparsify_2to4: %s declined: %s", node.name, reason)
                continue
            assert weight is not None
            sparse = apply_nm(weight, axis, self.pattern)
            groups = int(np.prod(weight.shape)) // weight.shape[axis] * -(-weight.shape[axis] // self.pattern.m)
            ok = nm_fraction(sparse, axis, self.pattern)
            result.stats["groups"] += groups
            result.stats["groups_ok"] += int(round(ok * groups))
            if np.array_equal(sparse, weight):
                result.stats["already"] += 1
                continue
            ir.write_input(graph, node, 1, sparse)
            zeroed = int(np.count_nonzero(weight) - np.count_nonzero(sparse))
            result.stats["layers"] += 1
            result.stats["zeroed"] += zeroed
            result.changed.append(f"{node.name}: {self.pattern} along axis {axis}")
            zeros = round(float(np.mean(sparse == 0)), 6)
            entries.append(
                {
                    "node": node.name,
                    "op": node.op,
                    "kind": "n:m",
                    "pattern": str(self.pattern),
                    "tensor": node.inputs[1].name,
                    "axis": axis,
                    "zero_fraction": zeros,
                    "pattern_fraction": ok,
                }
            )
            result.modified = True
        result.data["layers"] = entries
        record.add_layers(ctx, entries)
        return result

    def _check(self, node: ir.Node, pruned: set[str]) -> tuple[str | None, np.ndarray | None, int]:
        glob = match_glob(node.name, self.options.skip)
        if glob:
            return f"skipped (matches {glob!r})", None, 0
        if node.name in pruned:
            return "channel-pruned earlier in this run (one kind of sparsity per layer)", None, 0
        weight = float_weight(node)
        if weight is None:
            return "its weight (input 1) is not a float constant", None, 0
        if weight.ndim < 2:
            return f"its weight is {weight.ndim}-D", None, 0
        axis = reduction_axis(node.op, weight.ndim, bool(node.attrs.get("transB", 0)))
        if weight.shape[axis] <= self.pattern.n:
            return f"its input-channel axis has length {weight.shape[axis]} <= {self.pattern.n}: left alone", None, 0
        return None, weight, axis
