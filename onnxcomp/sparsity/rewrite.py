"""Applying a chosen channel set to a coupled group (see :mod:`onnxcomp.sparsity.coupling`).

Edits run in two phases over all groups, because one layer can be a sink of one group (its input
channels shrink) and a source of another (its output channels shrink): first every group's inputs
side (:func:`prune_inputs`), then every group's outputs side (:func:`prune_outputs`). Each phase
reads the layer's current weight from the graph, so the edits compose. A least-squares refit
(:mod:`onnxcomp.sparsity.reconstruct`) later replaces a sink's weight and bias (:func:`prune_sink`). Constants that
other nodes also read get fresh copies (``ir.write_input``); every member tensor's recorded shape is
updated so the exported value_info stays true.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp import ir
from onnxcomp.ir import folded_value
from onnxcomp.sparsity.coupling import ChannelGroup, Sink


@dataclass
class Refit:
    """A sink's new weight (node layout, input channels already removed) and effective bias."""

    weight: np.ndarray
    bias: np.ndarray | None  # per output channel; None: leave the bias as it is


def _current(node: ir.Node, index: int) -> np.ndarray:
    value = folded_value(node.inputs[index])
    assert value is not None, f"{node.name}: input {index} is not constant"
    return value


def _has_input(node: ir.Node, index: int) -> bool:
    return len(node.inputs) > index and bool(node.inputs[index].name)


def sink_input_axis(node: ir.Node) -> int:
    """The weight axis a sink reduces its input channels over."""
    if node.op == "Gemm":
        return 1 if node.attrs.get("transB", 0) else 0
    return 1 if node.op == "Conv" else 0


def _set_bias(graph: ir.Graph, node: ir.Node, bias: np.ndarray, dtype: np.dtype) -> None:
    """Write ``bias`` (per output channel) as the node's bias: Conv B, Gemm C (beta=1), or an Add."""
    bias = bias.astype(dtype)
    base = node.name or node.op
    if node.op == "MatMul":
        out = node.outputs[0]
        pre = ir.make_variable(graph, f"{out.name}_unbiased", dtype=out.dtype, shape=out.shape)
        node.outputs[0] = pre
        const = ir.make_constant(ir.unique_name(graph, f"{base}_bias"), bias)
        ir.make_node(graph, "Add", [pre, const], [out], name=f"{base}_bias_add")
        return
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    if _has_input(node, 2):
        ir.write_input(graph, node, 2, bias)
        return
    const = ir.make_constant(ir.unique_name(graph, f"{base}_bias"), bias)
    while len(node.inputs) < 2:
        node.inputs.append(ir.Variable(""))
    if len(node.inputs) > 2:
        node.inputs[2] = const
    else:
        node.inputs.append(const)


def prune_sink(graph: ir.Graph, sink: Sink, keep: np.ndarray, refit: Refit | None) -> None:
    """Remove the input channels of ``sink`` not in ``keep`` (or install its least-squares refit)."""
    node = sink.node
    weight = _current(node, 1)
    if refit is None:
        positions = sink.layout.positions(keep)
        ir.write_input(graph, node, 1, np.take(weight, positions, axis=sink_input_axis(node)))
        return
    if node.op == "Gemm":
        node.attrs["alpha"] = 1.0
    ir.write_input(graph, node, 1, refit.weight.astype(weight.dtype))
    if refit.bias is not None:
        _set_bias(graph, node, refit.bias, weight.dtype)


def prune_inputs(graph: ir.Graph, group: ChannelGroup, keep: np.ndarray) -> None:
    """Phase 1: sinks, per-channel constants, depthwise convs, reshape shapes and member shapes."""
    for sink in group.sinks:
        prune_sink(graph, sink, keep, None)
    for edit in group.consts:
        sliced = np.take(edit.value, edit.layout.positions(keep), axis=edit.layout.axis)
        ir.write_input(graph, edit.node, edit.index, sliced)
    for node in group.depthwise:
        ir.write_input(graph, node, 1, np.take(_current(node, 1), keep, axis=0))
        if _has_input(node, 2):
            ir.write_input(graph, node, 2, np.take(_current(node, 2), keep, axis=0))
        node.attrs["group"] = len(keep)
    for node, shape, layout in group.reshapes:
        if shape and shape[-1] != -1:
            new = [*shape[:-1], len(layout.positions(keep))]
            ir.write_input(graph, node, 1, np.asarray(new, dtype=np.int64))
    for tensor, layout in group.members.values():
        shape = tensor.shape
        if shape is not None and len(shape) == layout.rank and isinstance(shape[layout.axis], int):
            shape = list(shape)
            shape[layout.axis] = len(layout.positions(keep))
            tensor.shape = shape


def prune_outputs(graph: ir.Graph, group: ChannelGroup, keep: np.ndarray) -> None:
    """Phase 2: the sources' output channels (weight and bias)."""
    for source in group.sources:
        node = source.node
        ir.write_input(graph, node, 1, np.take(_current(node, 1), keep, axis=source.axis))
        if not _has_input(node, 2):
            continue
        bias = _current(node, 2)
        if node.op == "Conv":
            ir.write_input(graph, node, 2, np.take(bias, keep, axis=0))
        elif bias.ndim and bias.shape[-1] == group.channels:
            ir.write_input(graph, node, 2, np.take(bias, keep, axis=-1))
