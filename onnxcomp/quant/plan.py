"""Which nodes get quantized, and which of their tensors: the plan the emitters carry out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxcomp import ir
from onnxcomp.ir import WeightLayout, weight_layout
from onnxcomp.quant.spec import NodeSpec, QuantConfig

#: Ops a quantized output is carried through: ORT removes a Relu/Clip before a Q whose zero point
#: is the grid's minimum, then fuses Conv+Q into QLinearConv.
FUSABLE_ACTIVATIONS = ("Relu", "Clip")


@dataclass
class NodePlan:
    node: ir.Node
    spec: NodeSpec
    weight_index: int | None = None
    layout: WeightLayout | None = None
    bias_index: int | None = None
    weight_shape: tuple[int, ...] = ()
    activation_inputs: list[ir.Tensor] = field(default_factory=list)
    activation_outputs: list[ir.Tensor] = field(default_factory=list)


def _weight_index(node: ir.Node) -> int | None:
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        return 1
    if node.op == "MatMul":
        return 1 if ir.is_constant(node.inputs[1]) else None
    return None


def _decline_weight(node: ir.Node, index: int | None, plan_spec: NodeSpec) -> str | None:
    if index is None or index >= len(node.inputs):
        return "no constant weight input (activation x activation products are left in float)"
    value = ir.constant_value(node.inputs[index])
    if value is None:
        return f"weight {node.inputs[index].name!r} is not a constant"
    if value.dtype != np.float32:
        return f"weight {node.inputs[index].name!r} is {value.dtype}, not float32 (already quantized?)"
    if node.op == "MatMul" and value.ndim < 2:
        return "1-D MatMul weight"
    spec = plan_spec.weights
    if spec is not None and spec.granularity.kind == "group":
        layout = weight_layout(node.op, value.ndim, bool(node.attrs.get("transB", 0)))
        if value.shape[layout.reduction_axis] < spec.granularity.size // 2 and value.shape[layout.reduction_axis] < 8:
            return f"reduction axis of length {value.shape[layout.reduction_axis]} is too short for group:{spec.granularity.size}"
    return None


def _output_target(graph: ir.Graph, node: ir.Node) -> ir.Tensor | None:
    """The tensor to quantize after ``node``: its output, or that of a single following Relu/Clip.

    A Conv's output that is a graph output is quantized too (QLinearConv needs the Q; the graph
    output then carries the dequantized values); MatMul and Gemm have float-output integer kernels.
    """
    out = node.outputs[0]
    users = ir.consumers(out)
    if len(users) == 1 and users[0].op in FUSABLE_ACTIVATIONS and not ir.is_graph_output(graph, out):
        out = users[0].outputs[0]
        users = ir.consumers(out)
    if node.op == "Conv" and ir.is_graph_output(graph, out):
        return out
    return out if users else None


#: Ops a squeeze-excite branch passes through between its pooling and its convs.
_SE_PATH = ("Relu", "Clip", "HardSigmoid", "Sigmoid", "HardSwish", "Conv", "Identity")
#: Ops that pool a feature map down to one value per channel (the start of a squeeze-excite branch).
_POOLS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")


def _reads_pooled(tensor: ir.Tensor, depth: int = 0) -> bool:
    """True when ``tensor`` comes from a global pooling through at most 3 SE-branch ops."""
    node = ir.producer(tensor)
    if node is None or depth > 3:
        return False
    if node.op in _POOLS:
        return True
    return node.op in _SE_PATH and bool(node.inputs) and _reads_pooled(node.inputs[0], depth + 1)


def slower_as_integer(node: ir.Node, weight_shape: tuple[int, ...]) -> str | None:
    """Why an INT8 Conv would run slower than float on onnxruntime's x86 CPU provider, or None.

    Measured per node with onnxruntime's profiler (bench/README.md, "Placement"): QLinearConv is
    3-7x slower than the float NCHWc kernel for depthwise convs with < 64 channels or a kernel side
    over 3, and no faster for 1x1 convs with fewer than 32 input or output channels; leaving those
    in float made a MobileNetV3 1.4x faster. Squeeze-excite convs (on pooled 1x1 maps) stay
    quantized: they cost nothing either way and a float island between integer kernels does.
    """
    if node.op != "Conv" or len(weight_shape) != 4:
        return None
    cout, cin_g, kh, kw = weight_shape
    group = int(node.attrs.get("group", 1))
    if group > 1 and group == cout and cin_g == 1 and (cout < 64 or max(kh, kw) > 3):
        return f"depthwise {kh}x{kw} conv with {cout} channels runs faster in float on onnxruntime CPU"
    if group == 1 and kh == kw == 1 and min(cout, cin_g) < 32 and not _reads_pooled(node.inputs[0]):
        return f"1x1 conv {cin_g} -> {cout} channels is no faster as an integer kernel on onnxruntime CPU"
    return None


def _needs_output_q(graph: ir.Graph, shapes: ir.Shapes, node: ir.Node) -> bool:
    """Whether onnxruntime needs a Q on the node's output to run it as an integer kernel.

    Conv: QLinearConv needs it. MatMul runs as MatMulIntegerToFloat with a float output, so a Q
    there only adds error (MiniLM-L3 W8A8 embedding cosine 0.970 with it, 0.996 without) and
    time, except for a 2-D MatMul followed by a bias Add: ORT's MatMulAddFusion would first turn
    that pair into a float Gemm (``docs/onnxruntime.md#fused-patterns``). Gemm keeps its Q (QGemm).
    """
    if node.op != "MatMul":
        return True
    users = ir.consumers(node.outputs[0])
    if len(users) == 1 and users[0].op == "Add":
        rank = shapes.rank(node.inputs[0])
        return rank is None or rank <= 2
    return False


def plan_nodes(
    graph: ir.Graph, config: QuantConfig, output_quant: bool, placement: str = "all"
) -> tuple[list[NodePlan], list[tuple[str, str]]]:
    """Plans for every node the config selects, plus (node, reason) for those declined."""
    plans: list[NodePlan] = []
    declined: list[tuple[str, str]] = []
    shapes = ir.Shapes(graph)
    for node in ir.iter_nodes(graph, config.ops):
        spec = config.for_node(node.name, node.op)
        if spec is None:
            continue
        index = _weight_index(node)
        reason = _decline_weight(node, index, spec)
        if reason:
            declined.append((node.name, reason))
            continue
        assert index is not None
        value = ir.constant_value(node.inputs[index])
        a = spec.activations
        static_int = a is not None and a.granularity.kind == "tensor" and a.dtype in ("int8", "uint8")
        slow = (
            slower_as_integer(node, value.shape) if value is not None and static_int and placement == "speed" else None
        )
        if a is not None and a.granularity.kind == "dynamic" and node.op == "Conv" and placement == "speed":
            slow = "ConvInteger (dynamic per-tensor Conv) runs 4-40x slower than float on onnxruntime CPU"
        if slow is not None:
            declined.append((node.name, f"{slow} (placement speed; --placement all quantizes it)"))
            continue
        assert value is not None  # _decline_weight declined a non-constant weight
        value_shape = value.shape
        plan = NodePlan(
            node,
            spec,
            index,
            weight_layout(node.op, len(value_shape), bool(node.attrs.get("transB", 0))),
            weight_shape=tuple(value_shape),
        )
        bias = 2 if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 else None
        if bias is not None and node.inputs[2].name and ir.is_constant(node.inputs[2]):
            plan.bias_index = bias
        if spec.activations is not None:
            x = node.inputs[0]
            if not ir.is_constant(x):
                plan.activation_inputs.append(x)
            static = spec.activations.granularity.kind == "tensor"
            if output_quant and static and _needs_output_q(graph, shapes, node):
                target = _output_target(graph, node)
                if target is not None:
                    plan.activation_outputs.append(target)
        plans.append(plan)
    return plans, declined
