"""``fuse_hardswish``: ``x * Clip(x + 3, 0, 6) / 6`` written as ``x * HardSigmoid(x)``.

Exporters (Paddle, older PyTorch) spell hard-swish out in four elementwise ops, which onnxruntime
runs one by one (3.5 of 7.5 ms on a MobileNetV3 classifier). ``HardSigmoid(alpha=1/6, beta=1/2)``
computes ``Clip(x + 3, 0, 6) / 6`` in one op and onnxruntime fuses ``x * HardSigmoid(x)`` into a
single HardSwish kernel; both exist at every opset a model can have (HardSigmoid since opset 6).
"""

from __future__ import annotations

import numpy as np

from onnxcomp import ir
from onnxcomp.framework import Pass, PassContext, PassResult, register_pass


def _const(tensor: ir.Tensor, value: float) -> bool:
    got = ir.folded_value(tensor)
    return got is not None and got.size == 1 and float(got.reshape(-1)[0]) == value


def _other(node: ir.Node, tensor: ir.Tensor) -> ir.Tensor | None:
    """The input of a two-input node that is not ``tensor`` (None if neither or both are)."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is tensor and b is not tensor else a if b is tensor and a is not tensor else None


def _clip_bounds(clip: ir.Node) -> tuple[float, float] | None:
    if "min" in clip.attrs or "max" in clip.attrs:  # opset < 11
        return float(clip.attrs.get("min", -np.inf)), float(clip.attrs.get("max", np.inf))
    bounds = []
    for i in (1, 2):
        value = ir.folded_value(clip.inputs[i]) if len(clip.inputs) > i and clip.inputs[i].name else None
        if value is None or value.size != 1:
            return None
        bounds.append(float(value.reshape(-1)[0]))
    return bounds[0], bounds[1]


def _single_reader(graph: ir.Graph, tensor: ir.Tensor, op: str) -> ir.Node | None:
    readers = ir.consumers(tensor)
    if len(readers) != 1 or readers[0].op != op or ir.is_graph_output(graph, tensor):
        return None
    if not ir.owns(graph, readers[0]):  # read inside a nested body: the pattern crosses a scope
        return None
    return readers[0]


@register_pass
class FuseHardSwish(Pass):
    """Rewrite ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`` as ``Mul(x, HardSigmoid(x, 1/6, 1/2))``.

    Matches either operand order of the Add and the Mul, and a ``Mul`` by 1/6 in place of the
    Div. Declines (silently, nothing else looks like this) unless every intermediate tensor is read
    only by the next op of the pattern and is not a graph output.
    """

    name = "fuse_hardswish"
    bodies = True  # also rewrites inside If/Loop/Scan bodies (never across their boundary)

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        for clip in ir.iter_nodes(graph, ("Clip",)):
            match = self._match(graph, clip)
            if match is None:
                continue
            x, last = match
            base = last.name or last.outputs[0].name
            hs = ir.make_variable(graph, f"{base}_hardsigmoid", dtype=np.float32)
            ir.make_node(graph, "HardSigmoid", [x], [hs], f"{base}_HardSigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5})
            out = last.outputs[0]
            last.outputs.clear()  # the old chain is dead: finalize removes it
            ir.make_node(graph, "Mul", [x, hs], [out], f"{base}_hardswish_Mul")
            result.changed.append(base)
        if result.changed:
            result.modified = True
            result.stats["hardswish"] = len(result.changed)
        return result

    @staticmethod
    def _match(graph: ir.Graph, clip: ir.Node) -> tuple[ir.Tensor, ir.Node] | None:
        add = ir.producer(clip.inputs[0])
        if add is None or add.op != "Add" or not ir.owns(graph, add) or _clip_bounds(clip) != (0.0, 6.0):
            return None
        x = next((t for t in add.inputs if not _const(t, 3.0) and _other(add, t) is not None), None)
        three = _other(add, x) if x is not None else None
        if x is None or three is None or not _const(three, 3.0) or ir.is_constant(x):
            return None
        clipped = clip.outputs[0]
        if _single_reader(graph, add.outputs[0], "Clip") is not clip:
            return None
        mul = _single_reader(graph, clipped, "Mul")
        if mul is None or _other(mul, clipped) is not x:
            return None
        last = _single_reader(graph, mul.outputs[0], "Div") or _single_reader(graph, mul.outputs[0], "Mul")
        if last is None or last.inputs[0] is not mul.outputs[0]:
            return None
        scale = 6.0 if last.op == "Div" else float(np.float32(1.0 / 6.0))  # a float32 constant 1/6
        if not _const(last.inputs[1], scale):
            return None
        return x, last
