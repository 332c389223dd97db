"""Which nodes get quantized, and which of their tensors: the plan the emitters carry out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from onnxcomp import ir
from onnxcomp.formats import ElementFormat, get_format
from onnxcomp.ir import WeightLayout, weight_layout
from onnxcomp.quant.spec import Granularity, NodeSpec, QuantConfig

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
    """Which input holds the weight: 1, or 0 for a MatMul whose constant operand is on the left."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        return 1
    if node.op != "MatMul" or len(node.inputs) < 2:
        return None
    if ir.folded_value(node.inputs[1]) is not None or ir.quantized_source(node.inputs[1]) is not None:
        return 1
    return 0 if ir.folded_value(node.inputs[0]) is not None else None


def _decline_weight(node: ir.Node, index: int | None, plan_spec: NodeSpec) -> str | None:
    if index is None or index >= len(node.inputs):
        return "no constant weight input (activation x activation products are left in float)"
    value = ir.float_weight(node, index, "weight")  # the one definition every pass shares
    if isinstance(value, str):
        return value
    if value.dtype != np.float32:
        return f"weight {node.inputs[index].name!r} is {value.dtype}; only float32 weights are quantized"
    if node.op == "MatMul" and value.ndim < 2:
        return "1-D MatMul weight"
    spec = plan_spec.weights
    if spec is not None and spec.granularity.kind == "group":
        layout = weight_layout(node.op, value.ndim, bool(node.attrs.get("transB", 0)))
        if value.shape[layout.reduction_axis] < spec.granularity.size // 2 and value.shape[layout.reduction_axis] < 8:
            return f"reduction axis of length {value.shape[layout.reduction_axis]} is too short for group:{spec.granularity.size}"
    return None


def _move_left_weight(graph: ir.Graph, shapes: ir.Shapes, node: ir.Node) -> str | None:
    """Rewrite ``MatMul(W, X)`` as ``Transpose(MatMul(Transpose(X), W^T))`` so the weight is input B.

    Every quantized form (Q/DQ, MatMulNBits, dynamic, per-token, GPTQ) then applies unchanged; the
    two Transposes are the price (``(W X)^T = X^T W^T``, exact in float). None when rewritten, else why not.
    """
    x = node.inputs[1]
    rank = shapes.rank(x)
    if rank is None or rank < 2:
        what = "unknown" if rank is None else str(rank)
        return f"its constant operand is input A and input B {x.name!r} has rank {what} (need a known rank >= 2)"
    weight = ir.fold_constant_input(graph, node, 0)
    value = ir.constant_value(weight) if weight is not None else None
    if weight is None or value is None or value.ndim < 2:
        return "its constant operand is input A and is not a matrix"
    swap = [*range(rank - 2), rank - 1, rank - 2]
    base = ir.node_key(node)
    xt = ir.make_variable(graph, f"{x.name}_transposed", dtype=x.dtype)
    ir.make_node(graph, "Transpose", [x], [xt], name=f"{base}_input_transpose", attrs={"perm": swap})
    w_t = np.ascontiguousarray(np.swapaxes(value, -1, -2))
    moved = ir.make_constant(ir.unique_name(graph, f"{weight.name}_transposed"), w_t)
    out = node.outputs[0]
    yt = ir.make_variable(graph, f"{out.name}_transposed", dtype=out.dtype)
    node.inputs.clear()  # gs lists keep producer/consumer links: no slice assignment
    node.inputs.extend([xt, moved])
    node.outputs.clear()
    node.outputs.append(yt)
    out_rank = max(rank, value.ndim)
    back = [*range(out_rank - 2), out_rank - 1, out_rank - 2]
    ir.make_node(graph, "Transpose", [yt], [out], name=f"{base}_output_transpose", attrs={"perm": back})
    return None


def _int_activations(spec: NodeSpec) -> bool:
    a = spec.activations
    return a is not None and a.dtype in ("int8", "uint8") and a.granularity.kind in ("tensor", "dynamic")


def _kernel_granularity(node: ir.Node, spec: NodeSpec, weight_ndim: int) -> NodeSpec:
    """The spec with a weight granularity ORT's integer MatMul kernels accept.

    MatMulIntegerToFloat / DynamicQuantizeMatMul reject a per-channel zero point on a batched (3-D
    or more) B (``IsBQuantParamSupported``): such a model loads but fails its first run at
    ORT_ENABLE_ALL. Per-tensor weight scales are what those kernels take.
    """
    w = spec.weights
    if node.op == "MatMul" and weight_ndim > 2 and w is not None and w.granularity.kind == "channel":
        if _int_activations(spec):
            return replace(spec, weights=replace(w, granularity=Granularity("tensor")))
    return spec


def _per_channel_bias(graph: ir.Graph, node: ir.Node, channels: int) -> bool:
    """Fold the constant bias of ``node`` into an initializer of shape ``(channels,)`` if it broadcasts to it.

    A Gemm's C of shape ``()``, ``(1,)`` or ``(1, N)`` broadcasts over rows; the int32 bias of the
    integer kernels is per output channel, so it is written out at ``(N,)`` (exact). False when the
    bias is not constant or varies along the rows (it then stays a float input).
    """
    if len(node.inputs) < 3 or not node.inputs[2].name or isinstance(ir.float_weight(node, 2, "bias"), str):
        return False
    bias = ir.fold_constant_input(graph, node, 2)
    value = ir.constant_value(bias) if bias is not None else None
    if value is None:
        return False
    if value.shape == (channels,):
        return True
    if value.size not in (1, channels) or (value.ndim == 2 and value.shape[0] != 1) or value.ndim > 2:
        return False
    ir.write_input(graph, node, 2, np.broadcast_to(value.reshape(-1), (channels,)).astype(value.dtype))
    return True


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
        value = ir.folded_value(node.inputs[index])
        assert value is not None  # _decline_weight declined a non-constant weight
        a = spec.activations
        static_int = a is not None and a.granularity.kind == "tensor" and a.dtype in ("int8", "uint8")
        slow = slower_as_integer(node, value.shape) if static_int and placement == "speed" else None
        if a is not None and a.granularity.kind == "dynamic" and node.op == "Conv" and placement == "speed":
            slow = "ConvInteger (dynamic per-tensor Conv) runs 4-40x slower than float on onnxruntime CPU"
        if slow is not None:
            declined.append((node.name, f"{slow} (placement speed; --placement all quantizes it)"))
            continue
        if index == 0:
            why = _move_left_weight(graph, shapes, node)
            if why is not None:
                declined.append((node.name, why))
                continue
            index = 1
        ir.fold_constant_input(graph, node, index)  # the emitters rewrite initializers
        value = ir.constant_value(node.inputs[index])
        assert value is not None
        spec = _kernel_granularity(node, spec, value.ndim)
        layout = weight_layout(node.op, value.ndim, bool(node.attrs.get("transB", 0)))
        plan = NodePlan(node, spec, index, layout, weight_shape=tuple(value.shape))
        if node.op in ("Conv", "ConvTranspose", "Gemm") and _per_channel_bias(
            graph, node, value.shape[layout.channel_axis]
        ):
            plan.bias_index = 2
        if spec.activations is not None:
            x = node.inputs[0]
            if not ir.is_constant(x):
                plan.activation_inputs.append(x)
            static = spec.activations.granularity.kind == "tensor"
            # an output Q only serves onnxruntime's integer kernels: emulated float formats (FP8,
            # HiF8) have none, and there it would be a second emulation of the same values (on the
            # larger pre-pool tensor: 2 of the 9 subgraphs of the demo, half its emulation time)
            emulated = isinstance(get_format(spec.activations.dtype), ElementFormat)
            if output_quant and static and not emulated and _needs_output_q(graph, shapes, node):
                target = _output_target(graph, node)
                if target is not None:
                    plan.activation_outputs.append(target)
        plans.append(plan)
    return plans, declined
