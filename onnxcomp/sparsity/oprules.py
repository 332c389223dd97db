"""How ops move a group's channel axis: the per-op rules of :mod:`onnxcomp.sparsity.coupling`.

Each rule takes the channel :class:`~onnxcomp.sparsity.layout.Layout` of a node's data input and
returns what the node does with it, or raises :class:`Blocked` with a one-line reason naming the
node when the pass cannot follow the channels through it.
"""

from __future__ import annotations

import math

from onnxcomp import ir
from onnxcomp.ir import Shapes, describe, folded_value, int_list, node_axes, raw_axes
from onnxcomp.sparsity.layout import Layout

#: Ops that map channel c to channel c elementwise (broadcasting their other operands).
ELEMENTWISE = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Erf",
        "Softplus",
        "Softsign",
        "Mish",
        "ThresholdedRelu",
        "Abs",
        "Neg",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Sin",
        "Cos",
        "Identity",
        "Dropout",
        "Cast",
        "Clip",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "Where",
    }
)
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
REDUCES = frozenset(
    {
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceSum",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)
#: Per-channel normalizations and the indices of their per-channel parameter inputs.
NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


class Blocked(Exception):
    """The channels reach something the pass cannot follow; the message says what."""


def acting_axes(node: ir.Node, rank: int) -> list[int] | None:
    """The axes a Concat/Split/Reduce/Slice/Pad/Resize/Upsample acts on (None when unknown)."""
    op, attrs = node.op, node.attrs
    if op in ("Concat", "Split"):
        return [int(attrs.get("axis", 0)) % rank]
    if op in REDUCES:
        return node_axes(node, rank) or None
    if op == "Slice":
        if "axes" in attrs or len(node.inputs) < 4 or not node.inputs[3].name:
            explicit = node_axes(node, rank) if "axes" in attrs else None
            starts = int_list(node.inputs[1]) if len(node.inputs) > 1 else list(attrs.get("starts", []))
            return explicit if explicit is not None else (None if starts is None else list(range(len(starts))))
        axes = int_list(node.inputs[3])
        return None if axes is None else [a % rank for a in axes]
    if op == "Pad":
        pads = int_list(node.inputs[1]) if len(node.inputs) > 1 else list(attrs.get("pads", []))
        given = int_list(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else list(range(rank))
        if pads is None or given is None or len(pads) != 2 * len(given):
            return None
        return [a % rank for i, a in enumerate(given) if pads[i] or pads[i + len(given)]]
    if op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
        return None  # resized to sizes: the channel count is written in them
    index = 2 if op == "Resize" and len(node.inputs) > 2 else 1
    scales = folded_value(node.inputs[index]) if len(node.inputs) > index else None
    if scales is None or scales.size != rank:
        return None
    return [i for i, s in enumerate(scales.reshape(-1)) if float(s) != 1.0]


def flattened_layout(node: ir.Node, layout: Layout, shapes: Shapes) -> tuple[Layout, list[int] | None]:
    """The output layout of a Flatten or flattening Reshape, and the Reshape's shape (to rewrite)."""
    tensor, axis, rank = node.inputs[0], layout.axis, layout.rank
    shape = None
    if node.op == "Flatten":
        start = int(node.attrs.get("axis", 1))
        start = start + rank if start < 0 else start
    else:
        shape = int_list(node.inputs[1]) if len(node.inputs) > 1 else None
        if shape is None or node.attrs.get("allowzero", 0):
            raise Blocked(f"channels reach {describe(node)}, whose shape is computed at run time")
        start = _reshape_start(node, shape, layout, shapes)
    if axis < start:
        raise Blocked(f"{describe(node)} merges the channel axis into its leading axis")
    dims = [shapes.dim(tensor, i) for i in range(start, rank) if i != axis]
    if any(d is None for d in dims):
        raise Blocked(f"the shape of {tensor.name!r} (input of {describe(node)}) is not static")
    before = math.prod(d for d in dims[: axis - start] if d is not None)
    after = math.prod(d for d in dims[axis - start :] if d is not None)
    out_rank = start + 1 if shape is not None else 2
    return Layout(out_rank - 1, out_rank, layout.channels, layout.outer * before, layout.inner * after), shape


def _reshape_start(node: ir.Node, shape: list[int], layout: Layout, shapes: Shapes) -> int:
    """The axis a Reshape flattens from: it must keep the leading axes and flatten the rest."""
    start = len(shape) - 1
    dims = [shapes.dim(node.inputs[0], i) for i in range(layout.rank)]
    rest = [d for i, d in enumerate(dims[start:]) if i + start != layout.axis]
    total = None if any(d is None for d in rest) else math.prod(d for d in rest if d is not None) * layout.size
    lead_ok = all(
        s == 0 or (s > 0 and s == dims[i]) or (s == -1 and shape[-1] != -1) for i, s in enumerate(shape[:start])
    )
    if start < 1 or not lead_ok or shape[:start].count(-1) > 1 or shape[-1] not in (-1, total):
        raise Blocked(f"channels reach {describe(node)} to shape {shape}, which is not a flatten the pass can follow")
    return start


def moved_layout(node: ir.Node, layout: Layout) -> Layout:
    """The output layout of a Transpose, Squeeze or Unsqueeze."""
    axis, rank = layout.axis, layout.rank
    if node.op == "Transpose":
        perm = [int(p) for p in node.attrs.get("perm", range(rank - 1, -1, -1))]
        return Layout(perm.index(axis), rank, layout.channels, layout.outer, layout.inner)
    written = raw_axes(node)
    if written is None:
        raise Blocked(f"the axes of {describe(node)} are not constant")
    if node.op == "Squeeze":
        axes = node_axes(node, rank) or []
        if axis in axes:
            raise Blocked(f"{describe(node)} squeezes the channel axis")
        new_axis, new_rank = axis - sum(a < axis for a in axes), rank - len(axes)
    else:
        new_rank = rank + len(written)
        axes = node_axes(node, new_rank) or []
        new_axis = [i for i in range(new_rank) if i not in axes][axis]
    return Layout(new_axis, new_rank, layout.channels, layout.outer, layout.inner)
