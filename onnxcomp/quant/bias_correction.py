"""Bias correction: remove each quantized layer's mean output error through its bias.

Quantized weights (and activations) shift the mean of a layer's outputs; the shift passes into
every following layer (Nagel et al., "Data-Free Quantization", empirical variant). Per output
channel ``c`` the error ``e_c = E[y_q,c] - E[y_f,c]`` over the calibration data is measured with
onnxruntime (the float model gives ``E[y_f]``, the quantized model ``E[y_q]``) and subtracted at
the layer's *bias site*:

* Conv / ConvTranspose / Gemm with an int32 bias (``DequantizeLinear(int32, s_x * s_w)``): the
  codes become ``round(codes - e / scale)`` (the fused kernel keeps its int32 bias);
* a float bias: ``b - e`` (Gemm: ``(beta C - e) / beta``); no bias: one is created, int32 when the
  layer is a fully INT8 Conv/Gemm (so onnxruntime still fuses it), float otherwise;
* MatMulNBits: its bias input (created when absent);
* MatMul: the constant of the bias ``Add`` that follows it, else a new ``Add`` after the layer's
  float output (after its output Q/DQ pair, so the integer kernel is kept).

Variants: ``full`` corrects level by level in topological order (a layer's level is one more than
that of the deepest quantized layer upstream of it), each level measured on the model whose
upstream layers are already corrected: one pass over the calibration data per level. ``fast``
measures every layer's own error in one pass: beside each quantized layer runs a *shadow*, the
float layer reading the same (quantized-model) input, and ``e = E[y_q] - E[shadow]``; the errors
of upstream layers then cancel instead of being corrected twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.calibration.collect import Calibrator
from onnxcomp.calibration.moments import ChannelMean
from onnxcomp.framework.base import PassContext, PassResult
from onnxcomp.quant.emit import emit_bias_int32
from onnxcomp.quant.plan import NodePlan

_INT32 = np.iinfo(np.int32)


@dataclass
class Target:
    """One quantized layer to correct: its node in the quantized graph and the tensor measured."""

    node: ir.Node
    op: str  # the original op (Conv, ConvTranspose, Gemm, MatMul)
    tensor: str  # the layer's output, by the same name in the float and the quantized model
    entry: dict[str, Any]  # the layer's quant record entry (scales of an int32 bias to create)
    float_node: ir.Node | None = None  # the layer in the float graph (the fast variant's shadow)

    @property
    def axis(self) -> int:
        return 1 if self.op in ("Conv", "ConvTranspose") else -1


def output_mean_factories(graph: ir.Graph, nodes: list[ir.Node]) -> dict[str, Callable[[], ChannelMean]]:
    """Channel-mean collectors of the float layers' outputs (for the one calibration pass).

    A MatMul's following bias Add is watched too: written as MatMulNBits, the layer outputs it.
    """
    factories: dict[str, Callable[[], ChannelMean]] = {}
    for node in nodes:
        axis = 1 if node.op in ("Conv", "ConvTranspose") else -1
        out = node.outputs[0]
        factories[out.name] = partial(ChannelMean, axis)
        users = ir.consumers(out)
        if node.op == "MatMul" and len(users) == 1 and users[0].op == "Add":
            factories[users[0].outputs[0].name] = partial(ChannelMean, axis)
    return factories


def measured_tensor(graph: ir.Graph, node: ir.Node, op: str) -> str:
    """The tensor whose mean a layer's correction zeroes: its output, or that of its bias Add.

    A MatMul corrected through the bias Add after it (past its output Q/DQ pair) is measured at
    that Add's output, so the output quantization's rounding is corrected too; a layer writing a
    graph output through a Q/DQ pair, at that output.
    """
    if op == "MatMul" and node.op == "MatMul":
        add = _bias_add(graph, node.outputs[0])
        if add is not None:
            return str(add[0].outputs[0].name)
    out = _float_output(graph, node.outputs[0])
    if ir.is_graph_output(graph, out):  # a quantized graph output keeps its name after the DQ
        return str(out.name)
    return str(node.outputs[0].name)


def levels(graph: ir.Graph, targets: list[Target]) -> list[list[Target]]:
    """Targets grouped by depth: each group depends only on quantized layers of earlier groups."""
    by_node = {id(t.node): t for t in targets}
    depth: dict[int, int] = {}  # id(node) -> number of target layers on the deepest path up to and including it
    for node in graph.nodes:  # topologically sorted
        d = 0
        for x in node.inputs:
            p = ir.producer(x)
            if p is not None:
                d = max(d, depth.get(id(p), 0))
        depth[id(node)] = d + (1 if id(node) in by_node else 0)
    groups: dict[int, list[Target]] = {}
    for t in targets:
        groups.setdefault(depth[id(t.node)], []).append(t)
    return [groups[k] for k in sorted(groups)]


def correct_biases(
    graph: ir.Graph,
    template: onnx.ModelProto,
    targets: list[Target],
    reference: Mapping[str, np.ndarray],
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    variant: str,
    max_batches: int | None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Correct ``targets`` in ``graph`` against the float means ``reference``; node -> what was done."""
    done: dict[str, dict[str, Any]] = {}
    ir.finalize(graph)  # levels walk the nodes in topological order
    if variant == "fast":
        return _correct_fast(graph, template, targets, batches, max_batches, progress)
    groups = levels(graph, targets)
    for level, group in enumerate(groups):
        ir.finalize(graph)
        model = ir.export_model(graph, template)
        factories = {t.tensor: partial(ChannelMean, t.axis) for t in group}
        means = Calibrator(model, factories).run(batches(), max_batches=max_batches, progress=progress)
        del model
        for t in group:
            error = means[t.tensor].mean() - reference[t.tensor]
            site = _correct(graph, t, error.astype(np.float32))
            done[t.node.name] = {
                "variant": variant,
                "level": level,
                "site": site,
                "max_abs_error": float(np.max(np.abs(error))),
                "mean_abs_error": float(np.mean(np.abs(error))),
            }
    return done


def _correct_fast(
    graph: ir.Graph,
    template: onnx.ModelProto,
    targets: list[Target],
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    max_batches: int | None,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """One pass: each layer's output against its float shadow on the same input."""
    shadows: dict[str, str] = {}
    added = []
    for t in targets:
        if t.float_node is None or not t.node.inputs:
            continue
        f = t.float_node
        inputs = [
            t.node.inputs[0],
            *(ir.make_constant(ir.unique_name(graph, f"{x.name}_shadow"), v) for x, v in _consts(f)),
        ]
        out = ir.make_variable(graph, f"{t.node.outputs[0].name}_shadow", dtype=np.float32)
        added.append(ir.make_node(graph, f.op, inputs, [out], f"{f.name}_shadow", dict(f.attrs)))
        shadows[t.node.outputs[0].name] = out.name
    kept = list(graph.outputs)
    graph.outputs.extend(n.outputs[0] for n in added)  # live until measured (cleanup drops dead nodes)
    ir.finalize(graph)
    model = ir.export_model(graph, template)
    graph.outputs = kept
    axes = {t.node.outputs[0].name: t.axis for t in targets if t.node.outputs[0].name in shadows}
    factories = {name: partial(ChannelMean, axis) for out, axis in axes.items() for name in (out, shadows[out])}
    means = Calibrator(model, factories).run(batches(), max_batches=max_batches, progress=progress)
    del model
    for node in added:  # the shadows only measured: remove them before correcting
        node.inputs.clear()
        node.outputs.clear()
    ir.finalize(graph)
    done: dict[str, dict[str, Any]] = {}
    for t in targets:
        out = t.node.outputs[0].name
        if out not in axes:
            continue
        error = means[out].mean() - means[shadows[out]].mean()
        done[t.node.name] = {
            "variant": "fast",
            "level": 0,
            "site": _correct(graph, t, error.astype(np.float32)),
            "max_abs_error": float(np.max(np.abs(error))),
            "mean_abs_error": float(np.mean(np.abs(error))),
        }
    return done


def _consts(node: ir.Node) -> list[tuple[ir.Tensor, np.ndarray]]:
    """The constant inputs (weight, bias) of a float layer, in order."""
    found = []
    for x in node.inputs[1:]:
        value = ir.constant_value(x) if x.name else None
        if value is None:
            break
        found.append((x, value))
    return found


def _correct(graph: ir.Graph, t: Target, e: np.ndarray) -> str:
    node = t.node
    if node.op == "MatMulNBits":
        return _correct_input(graph, node, 5, e, "MatMulNBits bias")
    if node.op in ("Conv", "ConvTranspose", "Gemm") and node.op == t.op:
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if len(node.inputs) > 2 and node.inputs[2].name:
            dq = ir.producer(node.inputs[2])
            codes = ir.constant_value(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
            if dq is not None and codes is not None and codes.dtype == np.int32:
                scale = ir.constant_value(dq.inputs[1])
                assert scale is not None  # emit_bias_int32 writes constant scales
                shifted = np.rint(codes.astype(np.float64) - e.astype(np.float64) / (scale.astype(np.float64) * beta))
                ir.write_input(graph, dq, 0, np.clip(shifted, _INT32.min, _INT32.max).astype(np.int32))
                return "int32 bias"
            return _correct_input(graph, node, 2, e / np.float32(beta), "bias")
        scales = _int32_scales(t.entry)
        if scales is not None:
            while len(node.inputs) < 2:  # pragma: no cover - quantized layers always have a weight
                node.inputs.append(ir.omitted())
            node.inputs.append(
                ir.make_constant(ir.unique_name(graph, f"{node.name}_bias"), np.zeros(e.shape, np.float32))
            )
            emit_bias_int32(graph, node, 2, -e / np.float32(beta), scales[0], scales[1])
            return "new int32 bias"
        return _correct_input(graph, node, 2, e / np.float32(beta), "bias")  # absent: created
    return _correct_after(graph, node, e)


def _correct_input(graph: ir.Graph, node: ir.Node, index: int, e: np.ndarray, what: str) -> str:
    """Subtract ``e`` from the float constant at input ``index`` (created as ``-e`` when absent)."""
    if len(node.inputs) > index and node.inputs[index].name:
        value = ir.constant_value(node.inputs[index])
        if value is not None and value.dtype == np.float32 and value.shape in ((e.size,), (1, e.size), (1,), ()):
            fixed = (np.broadcast_to(value.reshape(-1), e.shape) - e).reshape(value.shape[:-1] + e.shape)
            ir.write_input(graph, node, index, fixed.astype(np.float32))
            return what
        return _correct_after(graph, node, e)
    while len(node.inputs) < index:
        node.inputs.append(ir.omitted())
    bias = ir.make_constant(ir.unique_name(graph, f"{node.name}_bias"), (-e).astype(np.float32))
    if len(node.inputs) == index:
        node.inputs.append(bias)
    else:
        node.inputs[index] = bias
    return f"new {what}"


def _int32_scales(entry: Mapping[str, Any]) -> tuple[float, np.ndarray] | None:
    """(s_x, s_w) of a fully INT8 layer from its record entry, or None."""
    acts, weights = entry.get("activations"), entry.get("weights")
    if not isinstance(acts, list) or not acts or not isinstance(weights, Mapping):
        return None
    if entry.get("bias") != "int32" and not (
        acts[0].get("dtype") in ("int8", "uint8") and weights.get("dtype") in ("int8", "uint8")
    ):
        return None
    if weights.get("granularity") not in ("tensor", "channel"):
        return None
    return float(acts[0]["scale"]), np.asarray(weights["scale"], np.float32)


def _correct_after(graph: ir.Graph, node: ir.Node, e: np.ndarray) -> str:
    """The bias Add that follows ``node`` gets ``-e``; else a new Add after its float output."""
    found = _bias_add(graph, node.outputs[0])
    if found is not None:
        add, other, value = found
        target = np.broadcast_shapes(value.shape, e.shape)
        ir.write_input(graph, add, other, (np.broadcast_to(value, target) - e).astype(np.float32))
        return "following bias Add"
    out = _float_output(graph, node.outputs[0])
    pre = ir.make_variable(graph, f"{out.name}_uncorrected", dtype=out.dtype, shape=out.shape)
    producer = ir.producer(out)
    assert producer is not None
    producer.outputs[list(producer.outputs).index(out)] = pre
    const = ir.make_constant(ir.unique_name(graph, f"{out.name}_bias_correction"), (-e).astype(np.float32))
    ir.make_node(graph, "Add", [pre, const], [out], f"{node.name}_bias_correction")
    return "new Add"


def _bias_add(graph: ir.Graph, out: ir.Tensor) -> tuple[ir.Node, int, np.ndarray] | None:
    """(Add, index of its constant, constant) of a per-channel bias Add reading ``out`` (past a Q/DQ pair)."""
    out = _float_output(graph, out)
    users = ir.consumers(out)
    if len(users) != 1 or users[0].op != "Add" or ir.is_graph_output(graph, out):
        return None
    add = users[0]
    other = 1 if add.inputs[0] is out else 0
    value = ir.constant_value(add.inputs[other])
    if value is None or value.dtype != np.float32 or value.ndim == 0 or value.shape[:-1] != (1,) * (value.ndim - 1):
        return None
    return add, other, value


def _float_output(graph: ir.Graph, out: ir.Tensor) -> ir.Tensor:
    """``out``, or the DQ output of an output Q -> DQ pair written right after it."""
    users = ir.consumers(out)
    if len(users) == 1 and users[0].op == "QuantizeLinear" and not ir.is_graph_output(graph, out):
        q_out = users[0].outputs[0]
        dqs = ir.consumers(q_out)
        if len(dqs) == 1 and dqs[0].op == "DequantizeLinear":
            return dqs[0].outputs[0]
    return out


def correct_layer_biases(
    graph: ir.Graph,
    float_model: Any,
    plans: list[NodePlan],
    record: list[dict[str, Any]],
    means: dict[str, Any],
    options: Any,
    ctx: PassContext,
    result: PassResult,
) -> None:
    """Bias correction of every quantized layer whose output the float model has by name."""
    targets = []
    float_nodes = {n.name: n for n in ir.import_model(float_model).nodes} if options.bias_correction == "fast" else {}
    for plan, entry in zip(plans, record, strict=False):
        tensor = measured_tensor(graph, plan.node, entry["op"])
        if tensor in means:
            targets.append(Target(plan.node, entry["op"], tensor, entry, float_nodes.get(entry["node"])))
        else:
            entry["bias_correction"] = {"skipped": "its output has no float counterpart by name"}
    assert ctx.calibration is not None
    done = correct_biases(
        graph,
        float_model,
        targets,
        {t.tensor: means[t.tensor].mean() for t in targets},
        ctx.calibration,
        options.bias_correction,
        options.calib_batches,
        ctx.progress.enabled,
    )
    for t in targets:
        t.entry["bias_correction"] = done[t.node.name]
    result.stats["bias_corrected"] = len(done)
