"""Where a per-input-channel scale can migrate, and the rewrite that migrates it.

SmoothQuant and AWQ rewrite ``y = x W`` as ``y = (x / s) (s W)``: W's input-channel rows times ``s``, ``1/s``
folded upstream; the float outputs do not change (within rounding). :func:`smooth_targets` groups
the candidates (MatMul with a constant 2-D weight, Gemm with ``transA=0``, Conv of any kernel and
group count) by input tensor (one shared ``s`` per group) and finds where ``1/s`` goes.

Fold sites, walking up from the shared tensor ``T`` when every reader of ``T`` is in the group and
``T`` is not a graph input/output (each tensor on the walk must feed only the next node):

* through ``Relu``, ``LeakyRelu`` and ``Identity`` (positively homogeneous: ``s > 0``), and through
  ``Add``/``Sub`` of a constant (the constant is divided by ``s``; the variable operand must carry
  the channel axis unbroadcast);
* into ``Mul`` by a constant (the constant times ``1/s``), ``Div`` by a constant (the divisor
  times ``s``), ``LayerNormalization`` over the last axis (scale and bias), inference
  ``BatchNormalization`` (scale and B), ``Conv`` (output channels of W and B), ``Gemm`` (output
  channels of B and C) or ``MatMul`` with a constant 2-D weight (its columns);
* otherwise an inserted ``Mul`` by the constant ``1/s`` that only the group reads.

The algorithms that choose ``s`` (SmoothQuant, AWQ) are in :mod:`onnxcomp.quant.smooth`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcomp import ir
from onnxcomp.errors import ConfigError
from onnxcomp.quant.equalize import scale_input_channels

log = logging.getLogger(__name__)

_THROUGH = ("Relu", "LeakyRelu", "Identity")


@dataclass
class FoldSite:
    """Where ``1/s`` goes: ``kind`` is the absorbing op or ``"inserted Mul"``."""

    kind: str
    node: ir.Node | None = None
    index: int = 0  # Mul/Div: the constant operand
    shifts: list[tuple[ir.Node, int]] = field(default_factory=list)  # Add/Sub constants divided by s
    through: list[str] = field(default_factory=list)  # names of the homogeneous nodes crossed

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "node": ir.node_key(self.node) if self.node is not None else None,
            "through": list(self.through),
            "shifted": [ir.node_key(n) for n, _ in self.shifts],
        }


@dataclass
class SmoothTarget:
    """A group of candidate nodes reading one tensor, the channel axis and the fold site."""

    tensor: str
    nodes: list[ir.Node]
    axis: int  # channel axis of the activation (for ChannelStats): -1 or 1
    channels: int
    fold: FoldSite
    trailing: int  # dims after the channel axis (0 for MatMul/Gemm, spatial rank for Conv)


# --- weights by input channel --------------------------------------------------------------


def _candidate(node: ir.Node) -> tuple[np.ndarray, int, int] | str:
    """(weight, channels, trailing dims) of a candidate node, or why it is not one."""
    if node.op not in ("MatMul", "Gemm", "Conv") or not ir.is_onnx_op(node) or len(node.inputs) < 2:
        return f"{ir.describe(node)} is not a MatMul, Gemm or Conv"
    if ir.is_constant(node.inputs[0]):
        return f"the input of {ir.describe(node)} is a constant"
    w = ir.float_weight(node, 1, "weight")
    if isinstance(w, str):
        return w
    if node.op == "MatMul":
        return (w, w.shape[0], 0) if w.ndim == 2 else f"the weight of {ir.describe(node)} is not 2-D"
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return f"{ir.describe(node)} has transA=1"
        return w, w.shape[1 if node.attrs.get("transB", 0) else 0], 0
    if w.ndim < 3:
        return f"the weight of {ir.describe(node)} has rank {w.ndim}"
    return w, w.shape[1] * int(node.attrs.get("group", 1)), w.ndim - 2


# --- fold sites ----------------------------------------------------------------------------


def _split_const(node: ir.Node) -> tuple[ir.Tensor, int] | None:
    if len(node.inputs) != 2:
        return None
    const = [i for i, t in enumerate(node.inputs) if ir.is_constant(t)]
    if len(const) != 1:
        return None
    value = ir.constant_value(node.inputs[const[0]])
    if value is None or value.dtype.name not in ir.FLOAT_DTYPES:
        return None
    return node.inputs[1 - const[0]], const[0]


def _consts_float(node: ir.Node, indices: Iterable[int]) -> bool:
    for i in indices:
        if len(node.inputs) > i and node.inputs[i].name and isinstance(ir.float_weight(node, i, "input"), str):
            return False
    return True


def _absorber(node: ir.Node, shapes: ir.Shapes, tensor: ir.Tensor, trailing: int) -> FoldSite | None:
    """The fold site when ``node`` (producing ``tensor``) absorbs 1/s, else None."""
    op = node.op
    rank = shapes.rank(tensor)
    axis1 = rank is not None and rank - 1 - trailing == 1  # channels on axis 1
    if op in ("Mul", "Div"):
        split = _split_const(node)
        if split is not None and (op == "Mul" or split[1] == 1):
            return FoldSite(op, node, split[1])
    elif op == "LayerNormalization" and trailing == 0 and len(node.inputs) >= 2:
        last = int(node.attrs.get("axis", -1)) in (-1, -1 if rank is None else rank - 1)
        if last and node.outputs[0] is tensor and _consts_float(node, (1, 2)) and ir.is_constant(node.inputs[1]):
            if len(node.inputs) < 3 or not node.inputs[2].name or ir.is_constant(node.inputs[2]):
                return FoldSite(op, node)
    elif op == "BatchNormalization" and axis1 and len(node.outputs) == 1 and not node.attrs.get("training_mode", 0):
        if all(ir.is_constant(t) for t in node.inputs[1:5]) and _consts_float(node, (1, 2)):
            return FoldSite(op, node)
    elif op in ("Conv", "Gemm", "MatMul") and len(node.inputs) >= 2 and not ir.is_constant(node.inputs[0]):
        w = ir.float_weight(node, 1, "weight")
        bias = len(node.inputs) > 2 and node.inputs[2].name
        if isinstance(w, str) or (bias and not (ir.is_constant(node.inputs[2]) and _consts_float(node, (2,)))):
            return None
        if op == "Conv" and axis1 and w.ndim == rank:
            return FoldSite(op, node)
        if op in ("Gemm", "MatMul") and trailing == 0 and w.ndim == 2:
            return FoldSite(op, node)
    return None


def _fold_site(graph: ir.Graph, shapes: ir.Shapes, target: SmoothTarget) -> FoldSite:
    inserted = FoldSite("inserted Mul")
    tensor = graph.tensors()[target.tensor]
    group = {id(n) for n in target.nodes}
    if ir.is_graph_output(graph, tensor) or any(t is tensor for t in graph.inputs):
        return inserted
    if any(id(n) not in group for n in ir.consumers(tensor)):
        return inserted
    cur, reader = tensor, None
    shifts: list[tuple[ir.Node, int]] = []
    through: list[str] = []
    for _ in range(32):
        if reader is not None and ir.exclusive_reason(graph, cur, reader, reader) is not None:
            return inserted
        node = ir.producer(cur)
        if node is None or not ir.is_onnx_op(node) or node.outputs[0] is not cur:
            return inserted
        site = _absorber(node, shapes, cur, target.trailing)
        if site is not None:
            site.shifts, site.through = shifts, through
            return site
        if node.op in _THROUGH and len(node.outputs) == 1:
            through.append(ir.node_key(node))
            cur, reader = node.inputs[0], node
            continue
        split = _split_const(node) if node.op in ("Add", "Sub") else None
        if split is None or shapes.dim(split[0], -1 - target.trailing) != target.channels:
            return inserted
        shifts.append((node, split[1]))
        cur, reader = split[0], node
    return inserted


def smooth_targets(graph: ir.Graph, nodes: Iterable[ir.Node]) -> list[SmoothTarget]:
    """Groups of the candidate ``nodes`` by input tensor, with their fold sites (see module doc).

    Nodes that are not candidates are left out (the reason is logged at debug level). Nodes of
    different kinds reading one tensor (channels on different axes) each get an inserted Mul.
    """
    groups: dict[tuple[str, int], SmoothTarget] = {}
    for node in nodes:
        cand = _candidate(node)
        if isinstance(cand, str):
            log.debug("smooth: %s", cand)
            continue
        _, channels, trailing = cand
        key = (node.inputs[0].name, trailing)
        if key in groups and groups[key].channels == channels:
            groups[key].nodes.append(node)
        elif key not in groups:
            axis = -1 if trailing == 0 else 1
            groups[key] = SmoothTarget(node.inputs[0].name, [node], axis, channels, FoldSite("inserted Mul"), trailing)
    shapes = ir.Shapes(graph)
    kinds: dict[str, int] = {}
    for name, _ in groups:
        kinds[name] = kinds.get(name, 0) + 1
    for target in groups.values():
        if kinds[target.tensor] == 1:
            target.fold = _fold_site(graph, shapes, target)
    return list(groups.values())


def channel_weight(node: ir.Node) -> np.ndarray:
    """The constant weight (input 1) of a candidate node."""
    w = ir.constant_value(node.inputs[1])
    assert w is not None
    return w


def _write(graph: ir.Graph, node: ir.Node, index: int, value: np.ndarray, like: np.ndarray) -> None:
    if not np.isfinite(value).all():
        raise ConfigError(f"scale migration would make input {index} of {ir.describe(node)} non-finite")
    ir.write_input(graph, node, index, np.asarray(value).astype(like.dtype))


def migrate_scales(graph: ir.Graph, target: SmoothTarget, s: np.ndarray) -> None:
    """W rows *= s for every node of the group; 1/s folded at the target's site."""
    for node in target.nodes:
        w = channel_weight(node)
        _write(graph, node, 1, scale_input_channels(node, w, s), w)
    inv = 1.0 / s
    vec = inv.reshape((-1,) + (1,) * target.trailing)
    site = target.fold
    for node, idx in site.shifts:
        c = ir.constant_value(node.inputs[idx])
        assert c is not None
        _write(graph, node, idx, c.astype(np.float64) * vec, c)
    node = site.node
    if node is None:
        tensor = graph.tensors()[target.tensor]
        const = ir.make_constant(ir.unique_name(graph, f"{target.tensor}_smooth_scale"), vec.astype(np.float32))
        dtype = channel_weight(target.nodes[0]).dtype
        if dtype != np.float32:
            const = ir.make_constant(const.name, vec.astype(dtype))
        out = ir.make_variable(graph, f"{target.tensor}_smoothed", tensor.dtype, tensor.shape)
        ir.make_node(graph, "Mul", [tensor, const], [out], f"{ir.node_key(target.nodes[0])}/smooth_mul")
        for reader in target.nodes:
            for i, t in enumerate(reader.inputs):
                if t is tensor:
                    reader.inputs[i] = out
        return
    scaled = {"Mul": [(site.index, vec)], "Div": [(site.index, 1.0 / vec)]}.get(node.op)
    if scaled is None and node.op in ("LayerNormalization", "BatchNormalization"):
        scaled = [(1, inv), (2, inv)]
    if scaled is None:  # Conv / Gemm / MatMul: output channels of the weight, and the bias
        w = channel_weight(node)
        if node.op == "Conv":
            wvec = inv.reshape((-1,) + (1,) * (w.ndim - 1))
        elif node.op == "Gemm" and node.attrs.get("transB", 0):
            wvec = inv[:, None]
        else:
            wvec = inv[None, :]
        scaled = [(1, wvec), (2, inv)]
    for idx, factor in scaled:
        if len(node.inputs) > idx and node.inputs[idx].name:
            c = ir.constant_value(node.inputs[idx])
            assert c is not None
            _write(graph, node, idx, c.astype(np.float64) * factor, c)
