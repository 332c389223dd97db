"""Per-node *local* error of a rewritten model: each node fed the reference model's own inputs.

The error at a node's output in a full run of the rewritten model is cumulative: it carries every
upstream layer's error, so the worst tensor is usually the last one, not the culprit. The local
error isolates one node: the candidate's node (with the quantize/dequantize or factor nodes that
were inserted in front of it) is run on the *reference* model's tensors, so only that node's own
rewrite contributes.

Nodes are matched by output tensor name, not by node name: onnxcomp keeps tensor names, and a
fusion moves the fused node's output name onto the node that absorbed it (a Conv that absorbed a
BatchNormalization writes the BatchNormalization's output), so the same name means the same value.
A candidate node whose output name also exists in the reference is a *target*; walking back from
its inputs, tensors the reference also has become inputs of a small "local" model (fed with the
reference's values), new tensors pull in the candidate nodes that make them (Q/DQ pairs, the first
factor of a decomposed layer), and initializers are copied. All targets go into one local model so
one onnxruntime run per batch evaluates every node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

#: A target whose inserted nodes span more than this is not "one node" any more: not evaluated locally.
MAX_INSERTED_NODES = 64
_SUBGRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_LOCAL_SUFFIX = "::local"


@dataclass(frozen=True)
class Target:
    """One candidate node evaluated locally: its name, op, the compared tensor and its local output name."""

    node: str
    op: str
    tensor: str
    local_name: str


@dataclass
class LocalPlan:
    """Which candidate nodes are evaluated locally, what they read from the reference, and why others are not."""

    targets: list[Target] = field(default_factory=list)
    feeds: list[str] = field(default_factory=list)  # reference tensors the local model reads
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # inserted nodes, then target copies
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def local_model(self, candidate: onnx.ModelProto, dtypes: dict[str, np.dtype]) -> onnx.ModelProto:
        """The local model; ``dtypes`` are the element types of the feeds (known after one reference run)."""
        inputs = [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtypes[name]), None)
            for name in self.feeds
        ]
        outputs = [helper.make_empty_tensor_value_info(t.local_name) for t in self.targets]
        graph = helper.make_graph(self.nodes, "local_error", inputs, outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=list(candidate.opset_import))
        model.ir_version = candidate.ir_version
        model.functions.extend(candidate.functions)
        return model


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in _SUBGRAPH_TYPES for a in node.attribute)


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


def plan_local_error(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> LocalPlan:
    """Match the candidate's top-level nodes to the reference by output tensor name and plan the local model."""
    ref_node_outputs = {o for n in reference.graph.node for o in n.output if o}
    ref_inits = {t.name for t in reference.graph.initializer}
    ref_values = ref_node_outputs | {i.name for i in reference.graph.input if i.name not in ref_inits}
    cand_inits = {t.name: t for t in candidate.graph.initializer}
    producer = {o: i for i, n in enumerate(candidate.graph.node) for o in n.output if o}
    plan = LocalPlan()
    inserted: dict[int, None] = {}  # candidate node indices, insertion-ordered
    feeds: dict[str, None] = {}
    used_inits: dict[str, None] = {}
    copies: list[onnx.NodeProto] = []
    for node in candidate.graph.node:
        compared = [o for o in node.output if o in ref_node_outputs]
        if not compared or node.op_type == "Constant":
            continue
        if _has_subgraph(node):
            plan.skipped.append((_label(node), "has a subgraph (If/Loop/Scan): not evaluated locally"))
            continue
        walk = _walk_inputs(candidate, node, ref_values, cand_inits, producer)
        if isinstance(walk, str):
            plan.skipped.append((_label(node), walk))
            continue
        nodes, node_feeds, node_inits = walk
        inserted.update(dict.fromkeys(nodes))
        feeds.update(dict.fromkeys(node_feeds))
        used_inits.update(dict.fromkeys(node_inits))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.output[:]
        copy.output.extend(o + _LOCAL_SUFFIX if o else "" for o in node.output)
        copies.append(copy)
        plan.targets.extend(Target(_label(node), node.op_type, o, o + _LOCAL_SUFFIX) for o in compared)
    plan.nodes = [candidate.graph.node[i] for i in sorted(inserted)] + copies
    plan.feeds = list(feeds)
    plan.initializers = [cand_inits[n] for n in used_inits]
    return plan


def _walk_inputs(
    candidate: onnx.ModelProto,
    node: onnx.NodeProto,
    ref_values: set[str],
    cand_inits: dict[str, onnx.TensorProto],
    producer: dict[str, int],
) -> tuple[list[int], list[str], list[str]] | str:
    """The inserted nodes, reference feeds and initializers ``node`` reads, or why it cannot be isolated."""
    nodes: dict[int, None] = {}
    feeds: dict[str, None] = {}
    inits: dict[str, None] = {}
    stack, seen = list(node.input), set()
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in cand_inits:
            inits[name] = None
        elif name in ref_values:
            feeds[name] = None
        elif name in producer:
            index = producer[name]
            maker = candidate.graph.node[index]
            if _has_subgraph(maker):
                return f"reads {name!r}, made by {_label(maker)} which has a subgraph"
            if any(o in ref_values for o in maker.output):
                return f"reads {name!r} from {_label(maker)}, which also writes a reference tensor"
            nodes[index] = None
            if len(nodes) > MAX_INSERTED_NODES:
                return f"more than {MAX_INSERTED_NODES} new nodes in front of it: not one node's error"
            stack.extend(maker.input)
        else:
            return f"reads {name!r}, which the reference model does not have"
    return list(nodes), list(feeds), list(inits)
