"""remove_identity: drop Identity nodes and inference-mode Dropout."""

from __future__ import annotations

from dataclasses import dataclass

from onnxcomp import ir
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass


def _dropout_is_inference(node: ir.Node) -> str | None:
    """None when the Dropout is a no-op at inference, else the reason it is not removable."""
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return "its mask output is used"
    if len(node.inputs) >= 3 and node.inputs[2].name:
        training = ir.constant_value(node.inputs[2])
        if training is None:
            return "training_mode is not a constant"
        if bool(training.reshape(-1)[0]):
            return "training_mode is true"
    return None


@register_pass
class RemoveIdentity(Pass):
    """Remove Identity nodes and Dropout nodes that are no-ops at inference.

    A Dropout is removed when its ``training_mode`` input is absent or a constant false and its
    mask output is unused. Declines a node whose input is a graph input or constant that feeds a
    graph output directly (removing it would rename a graph output).
    """

    name = "remove_identity"
    bodies = True  # also rewrites inside If/Loop/Scan bodies (never across their boundary)

    @dataclass(frozen=True)
    class Options:
        dropout: bool = True  # also remove inference-mode Dropout

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"identity": 0, "dropout": 0})
        for node in ir.iter_nodes(graph, ("Identity", "Dropout")):
            if node.op == "Dropout":
                if not self.options.dropout:
                    continue
                reason = _dropout_is_inference(node)
                if reason:
                    result.declined.append((node.name, reason))
                    continue
            ir.bypass_node(graph, node)
            if node.outputs:  # bypass kept it: input feeds a graph output directly
                result.declined.append((node.name, "its input feeds a graph output directly"))
                continue
            result.stats["identity" if node.op == "Identity" else "dropout"] += 1
            result.changed.append(node.name)
            result.modified = True
        return result
