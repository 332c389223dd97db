"""Channel coupling: the tensors and layers that must lose the same channels together.

Pruning output channel ``c`` of a layer removes index ``c`` of every tensor its channels flow into.
A :class:`ChannelGroup` is the closure of that flow, followed forwards and backwards:

* **sources** produce the channels: Conv (group 1), Gemm, MatMul with a constant 2-D weight; every
  source of a group loses the same output channels (a residual ``Add`` or an SE ``Mul`` of two
  layers' outputs couples them);
* **pass-through** ops carry channel ``c`` to channel ``c``: elementwise ops (constant per-channel
  operands are sliced, e.g. a bias ``Add``), BatchNormalization/InstanceNormalization, pools,
  depthwise Conv (multiplier 1; its weight, bias and ``group`` are sliced), Pad/Resize/Slice/
  Split/Concat/Reduce on other axes, Transpose/Squeeze/Unsqueeze, and ``Flatten`` or a flattening
  ``Reshape`` (each channel expands to its flattened positions, see :class:`Layout`);
* **sinks** consume the channels: Conv (group 1), Gemm (``transA=0``) and MatMul with a constant
  weight lose the matching input channels.

Anything else the channels reach blocks the whole group, which is then left alone with the reason:
a graph input or output, Concat along the channel axis, a grouped conv or a depthwise conv with a
channel multiplier, a Reshape that does not flatten (or whose shape is computed at run time),
ConvTranspose, or any op not listed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from onnxcomp import ir
from onnxcomp.ir import FLOAT_DTYPES, Shapes, describe, folded_value, is_onnx_op
from onnxcomp.sparsity.layout import Layout
from onnxcomp.sparsity.oprules import (
    ELEMENTWISE,
    NORMS,
    POOLS,
    REDUCES,
    Blocked,
    acting_axes,
    flattened_layout,
    moved_layout,
)

SOURCE_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")


@dataclass
class Source:
    node: ir.Node
    weight: np.ndarray
    axis: int  # the weight's output-channel axis


@dataclass
class Sink:
    node: ir.Node
    layout: Layout  # of the node's input 0


@dataclass
class ConstEdit:
    """A constant operand of a pass-through node holding one value per channel position."""

    node: ir.Node
    index: int
    value: np.ndarray
    layout: Layout  # the channel axis inside ``value``


@dataclass
class ChannelGroup:
    start: ir.Node  # the layer the group was grown from
    channels: int = 0
    sources: list[Source] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)
    members: dict[str, tuple[ir.Tensor, Layout]] = field(default_factory=dict)
    consts: list[ConstEdit] = field(default_factory=list)
    depthwise: list[ir.Node] = field(default_factory=list)
    reshapes: list[tuple[ir.Node, list[int], Layout]] = field(default_factory=list)  # (node, shape, output layout)
    blocked: str | None = None

    @property
    def names(self) -> list[str]:
        """The names of the group's layers (its sources; the start layer when it has none)."""
        return [s.node.name for s in self.sources] or [self.start.name]


def float_weight(node: ir.Node, index: int = 1) -> np.ndarray | None:
    """A node's constant floating-point weight input (None if absent or not constant float)."""
    if len(node.inputs) <= index:
        return None
    value = folded_value(node.inputs[index])
    return value if value is not None and value.dtype.name in FLOAT_DTYPES else None


def conv_group(node: ir.Node) -> int:
    return int(node.attrs.get("group", 1)) if node.op == "Conv" else 1


class CouplingAnalysis:
    """Finds the channel groups of a graph (see the module docstring)."""

    def __init__(self, graph: ir.Graph, source_ops: tuple[str, ...] = SOURCE_OPS) -> None:
        self.graph = graph
        self.shapes = Shapes(graph)
        self.source_ops = source_ops
        self._group: ChannelGroup  # the group being built (set by build)
        self._queue: deque[ir.Tensor] = deque()
        self._done: set[tuple[int, str]] = set()

    def groups(self) -> list[ChannelGroup]:
        """One group per set of coupled sources (in graph order); blocked groups included."""
        seen: set[int] = set()
        out = []
        for node in ir.iter_nodes(self.graph, self.source_ops):
            if id(node) in seen or not is_onnx_op(node) or conv_group(node) != 1 or float_weight(node) is None:
                continue
            group = self.build(node)
            seen.update(id(s.node) for s in group.sources)
            seen.add(id(node))
            out.append(group)
        return out

    def build(self, start: ir.Node) -> ChannelGroup:
        """The group of ``start``'s output channels."""
        self._group, self._queue, self._done = ChannelGroup(start), deque(), set()
        try:
            self._add_source(start)
            while self._queue:
                self._visit(self._queue.popleft())
        except Blocked as exc:
            self._group.blocked = str(exc)
        return self._group

    # --- traversal ---------------------------------------------------------------------------

    def _visit(self, tensor: ir.Tensor) -> None:
        if ir.is_graph_output(self.graph, tensor):
            raise Blocked(f"channels reach graph output {tensor.name!r}")
        node = ir.producer(tensor)
        if node is None:
            raise Blocked(f"channels come from graph input {tensor.name!r}")
        if node.op in SOURCE_OPS and conv_group(node) == 1:
            self._add_source(node)
        else:
            self._pass_through(node)
        for user in ir.consumers(tensor):
            if user.op in SOURCE_OPS and conv_group(user) == 1:
                self._add_sink(user, tensor)
            else:
                self._pass_through(user)

    def _once(self, node: ir.Node, role: str) -> bool:
        key = (id(node), role)
        if key in self._done:
            return False
        self._done.add(key)
        return True

    def _add(self, tensor: ir.Tensor, layout: Layout) -> None:
        members = self._group.members
        if tensor.name in members:
            if members[tensor.name][1] != layout:
                raise Blocked(f"tensor {tensor.name!r} carries the channels on two different axes")
            return
        dim = self.shapes.dim(tensor, layout.axis)
        if dim is not None and dim != layout.size:
            raise Blocked(f"tensor {tensor.name!r} has {dim} entries on axis {layout.axis}, expected {layout.size}")
        members[tensor.name] = (tensor, layout)
        self._queue.append(tensor)

    def _rank(self, tensor: ir.Tensor, node: ir.Node) -> int:
        rank = self.shapes.rank(tensor)
        if rank is None:
            raise Blocked(f"the rank of {tensor.name!r} (at {describe(node)}) is unknown")
        return rank

    def _layout_of(self, node: ir.Node) -> tuple[ir.Tensor, Layout]:
        for tensor in [*node.inputs, *node.outputs]:
            if tensor.name in self._group.members:
                return self._group.members[tensor.name]
        raise AssertionError(f"{describe(node)} reached without a member tensor")

    # --- sources and sinks -------------------------------------------------------------------

    def _add_source(self, node: ir.Node) -> None:
        if not self._once(node, "source"):
            return
        if node.op not in self.source_ops or not is_onnx_op(node):
            raise Blocked(f"channels come from {describe(node)}, which is not among the pruned ops")
        weight = float_weight(node)
        if weight is None:
            raise Blocked(f"channels come from {describe(node)}, whose weight is not a float constant")
        if node.op == "Conv":
            axis, channels, rank = 0, weight.shape[0], weight.ndim
        elif node.op == "Gemm":
            if weight.ndim != 2:
                raise Blocked(f"the weight of {describe(node)} is {weight.ndim}-D")
            axis = 0 if node.attrs.get("transB", 0) else 1
            channels, rank = weight.shape[axis], 2
        else:
            if weight.ndim != 2:
                raise Blocked(f"the weight of {describe(node)} is {weight.ndim}-D, not 2-D")
            axis, channels, rank = 1, weight.shape[1], self._rank(node.inputs[0], node)
            if rank < 2:
                raise Blocked(f"the input of {describe(node)} is 1-D")
        group = self._group
        if not group.sources:
            group.channels = channels
        elif channels != group.channels:
            raise Blocked(
                f"coupled layers have different channel counts ({describe(node)}: {channels}, "
                f"{describe(group.sources[0].node)}: {group.channels})"
            )
        group.sources.append(Source(node, weight, axis))
        self._add(node.outputs[0], Layout(rank - 1 if node.op == "MatMul" else 1, rank, channels))

    def _add_sink(self, node: ir.Node, tensor: ir.Tensor) -> None:
        if not self._once(node, "sink"):
            return
        if not is_onnx_op(node) or node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
            raise Blocked(f"channels reach an input of {describe(node)} other than its data input")
        _, layout = self._group.members[tensor.name]
        weight = float_weight(node)
        if weight is None:
            raise Blocked(f"channels reach {describe(node)}, whose weight is not a float constant")
        if node.op == "Conv":
            ok, k = layout.axis == 1 and layout.plain, weight.shape[1]
        elif node.op == "Gemm":
            if node.attrs.get("transA", 0):
                raise Blocked(f"channels reach {describe(node)} with transA=1")
            ok, k = layout.axis == 1 and weight.ndim == 2, weight.shape[1 if node.attrs.get("transB", 0) else 0]
        else:
            ok, k = layout.axis == layout.rank - 1 and weight.ndim == 2, weight.shape[0]
        if not ok or k != layout.size:
            raise Blocked(f"channels reach {describe(node)} on an axis it does not reduce over")
        self._group.sinks.append(Sink(node, layout))

    # --- pass-through ops --------------------------------------------------------------------

    def _pass_through(self, node: ir.Node) -> None:
        if not self._once(node, "pass"):
            return
        op = node.op
        if not is_onnx_op(node):
            raise Blocked(f"channels reach {describe(node)} (domain {node.domain!r}), which the pass cannot follow")
        if op in ELEMENTWISE:
            self._elementwise(node)
        elif op in NORMS or op in POOLS:
            self._channelwise(node, NORMS.get(op, ()))
        elif op == "Conv":
            self._depthwise(node)
        elif op in ("Pad", "Resize", "Upsample", "Slice", "Split", "Concat") or op in REDUCES:
            self._along_other_axes(node)
        elif op in ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"):
            self._reshaping(node)
        else:
            raise Blocked(f"channels reach {describe(node)}, which the pass cannot follow")

    def _extra_outputs_unused(self, node: ir.Node) -> None:
        for out in node.outputs[1:]:
            if out.name and (ir.consumers(out) or ir.is_graph_output(self.graph, out)):
                raise Blocked(f"the output {out.name!r} of {describe(node)} is used")

    def _elementwise(self, node: ir.Node) -> None:
        self._extra_outputs_unused(node)
        _, layout = self._layout_of(node)
        for index, tensor in enumerate(node.inputs):
            if not tensor.name or tensor.name in self._group.members:
                continue
            value = folded_value(tensor)
            if value is not None:
                self._const_operand(node, index, value, layout)
                continue
            rank = self._rank(tensor, node)
            if rank < -layout.neg or self.shapes.dim(tensor, layout.neg) == 1:
                continue
            self._add(tensor, layout.at_rank(rank))
        self._add(node.outputs[0], layout.at_rank(self._rank(node.outputs[0], node)))

    def _const_operand(self, node: ir.Node, index: int, value: np.ndarray, layout: Layout) -> None:
        if value.ndim < -layout.neg or value.shape[layout.neg] == 1:
            return
        if value.shape[layout.neg] != layout.size:
            raise Blocked(
                f"constant {node.inputs[index].name!r} of {describe(node)} has {value.shape[layout.neg]} entries "
                f"on the channel axis, expected {layout.size}"
            )
        self._group.consts.append(ConstEdit(node, index, value, layout.at_rank(value.ndim)))

    def _channelwise(self, node: ir.Node, params: tuple[int, ...]) -> None:
        """BatchNormalization/InstanceNormalization/pools: channels on axis 1, same layout in and out."""
        self._extra_outputs_unused(node)
        _, layout = self._layout_of(node)
        if layout.axis != 1 or (node.op in POOLS and not layout.plain):
            raise Blocked(f"channels reach {describe(node)} on axis {layout.axis}, not its channel axis 1")
        for index in params:
            value = folded_value(node.inputs[index]) if index < len(node.inputs) else None
            if value is None or value.shape != (layout.size,):
                raise Blocked(f"parameter {index} of {describe(node)} is not a constant vector of {layout.size}")
            vector = Layout(0, 1, layout.channels, layout.outer, layout.inner)
            self._group.consts.append(ConstEdit(node, index, value, vector))
        self._add(node.inputs[0], layout)
        self._add(node.outputs[0], layout)

    def _depthwise(self, node: ir.Node) -> None:
        _, layout = self._layout_of(node)
        weight = float_weight(node)
        group = conv_group(node)
        if weight is None:
            raise Blocked(f"channels reach {describe(node)} (group={group}), whose weight is not a float constant")
        if weight.shape[1] != 1 or group != layout.channels or not layout.plain or layout.axis != 1:
            raise Blocked(f"channels reach grouped {describe(node)} (group={group}), which is not depthwise")
        if weight.shape[0] != group:
            multiplier = weight.shape[0] // group
            raise Blocked(f"channels reach depthwise {describe(node)} with channel multiplier {multiplier}")
        self._group.depthwise.append(node)
        self._add(node.inputs[0], layout)
        self._add(node.outputs[0], layout)

    def _along_other_axes(self, node: ir.Node) -> None:
        """Ops that keep the channel axis intact when they act on other axes only."""
        self._extra_outputs_unused(node)
        tensor, layout = self._layout_of(node)
        axes = acting_axes(node, layout.rank)
        if axes is None or layout.axis in axes:
            raise Blocked(f"channels reach {describe(node)}, which acts on the channel axis (or on unknown axes)")
        keep_rank = node.op not in REDUCES or node.attrs.get("keepdims", 1)
        if not keep_rank:
            if tensor is not node.inputs[0]:
                raise Blocked(f"channels reach {describe(node)} from its output side")
            rank = layout.rank - len(axes)
            self._add(
                node.outputs[0],
                Layout(
                    layout.axis - sum(a < layout.axis for a in axes), rank, layout.channels, layout.outer, layout.inner
                ),
            )
            return
        data = list(node.inputs) if node.op == "Concat" else [node.inputs[0]]
        for t in [*data, *(o for o in node.outputs if o.name)]:
            self._add(t, layout)

    def _reshaping(self, node: ir.Node) -> None:
        """Flatten, flattening Reshape, Transpose, Squeeze, Unsqueeze: followed forwards only."""
        tensor, layout = self._layout_of(node)
        if tensor is not node.inputs[0]:
            raise Blocked(f"channels reach {describe(node)} from its output side")
        if node.op in ("Flatten", "Reshape"):
            out, shape = flattened_layout(node, layout, self.shapes)
            if shape is not None:
                self._group.reshapes.append((node, shape, out))
        else:
            out = moved_layout(node, layout)
        self._add(node.outputs[0], out)
