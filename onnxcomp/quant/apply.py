"""Carrying out quantization plans: quantize weights, emit, and record (``quant.record``).

The calibration statistics the plans need are collected and read in ``quant.statistics``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcomp import ir
from onnxcomp.errors import ConfigError
from onnxcomp.formats import ElementFormat, get_format
from onnxcomp.framework.base import PassContext
from onnxcomp.ir.spill import spill_constants
from onnxcomp.quant.activation_subgraphs import (
    emit_hif8_activation,
    emit_mx_activation,
)
from onnxcomp.quant.dynamic import emit_dynamic_fake_quant, emit_dynamic_tensor
from onnxcomp.quant.emit import (
    activation_qparams,
    emit_bias_int32,
    emit_dynamic_per_token,
    emit_lut_dq_weight,
    emit_lut_weight,
    emit_static_activation,
    emit_two_level_weight,
    emit_weight_dq,
    shield_float_readers,
)
from onnxcomp.quant.folded_weights import emit_cast_weight, folds_at_load
from onnxcomp.quant.gptq import gptq_quantize
from onnxcomp.quant.lowbit import stored_as
from onnxcomp.quant.matmulnbits import bias_add, emit_matmulnbits, pack_weight, weight_constants
from onnxcomp.quant.plan import NodePlan
from onnxcomp.quant.qweight import QuantizedWeight
from onnxcomp.quant.record import weight_record
from onnxcomp.quant.spec import Granularity, NodeSpec, TensorSpec
from onnxcomp.quant.weights import quantize_weight, raise_scales


def _int8_pair(plan: NodePlan) -> bool:
    w, a = plan.spec.weights, plan.spec.activations
    return (
        w is not None
        and a is not None
        and w.dtype in ("int8", "uint8")
        and a.dtype in ("int8", "uint8")
        and w.granularity.kind in ("tensor", "channel")
        and a.granularity.kind == "tensor"
    )


def apply_plans(
    graph: ir.Graph,
    plans: list[NodePlan],
    ranges: dict[str, tuple[float, float]],
    options: Any,
    ctx: PassContext,
    energies: dict[str, np.ndarray] | None = None,
    hessians: dict[str, np.ndarray] | None = None,
    learned: Mapping[str, QuantizedWeight] | None = None,
) -> list[dict[str, Any]]:
    """Emit every plan into ``graph``; returns the record (one entry per quantized node).

    ``hessians`` (node name -> mean ``X^T X`` of its input) select GPTQ for those nodes' weights;
    ``learned`` (node name -> quantized weight, e.g. distilled) replaces their quantization.
    """
    state = _Written(hessians=hessians or {})
    for plan in plans:
        if learned and plan.node.name in learned and plan.weight_index is not None and plan.spec.weights is not None:
            key = (plan.node.inputs[plan.weight_index].name, plan.spec.weights, plan.layout)
            state.quantized[key] = learned[plan.node.name]
    record = []
    # Each weight's quantized form (and its float dequantized copy) is dropped after the last node
    # reading it: a pass over a big model holds one float weight at a time, not all of them.
    names = [_weight_name(plan) for plan in plans]  # before _apply_one rewrites the nodes
    readers = Counter(names)
    with ctx.progress(len(plans), "quantizing") as bar:
        for plan, name in zip(plans, names, strict=True):
            record.append(_apply_one(graph, plan, ranges, options, state, energies or {}))
            readers[name] -= 1
            if name is not None and readers[name] == 0:
                state.forget(name)
                spill_constants(graph)  # a run writing a mapped model: its new weights to disk (ir.spill)
            bar.update(1)
    shield_float_readers(graph)  # float-pinned readers of quantized tensors stay float on onnxruntime
    spill_constants(graph)
    return record


@dataclass
class _Written:
    """What one run has written so far: each weight, activation and packed weight is written once."""

    weights: dict[tuple[str, TensorSpec, Any], tuple[QuantizedWeight, ir.Tensor, str]] = field(default_factory=dict)
    acts: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantized: dict[tuple[str, TensorSpec, Any], QuantizedWeight] = field(default_factory=dict)
    packed: dict[tuple[int, bool], list[ir.Tensor]] = field(default_factory=dict)
    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    #: dynamic FP8 / HiF8 / MX emulations by (tensor, format, axis): every reader of a tensor shares one
    emulated: dict[tuple[str, str, int], ir.Tensor] = field(default_factory=dict)

    def forget(self, weight: str) -> None:
        """Drop what is kept of ``weight`` (no node left reads it); packed entries go too, as
        they are keyed by the id of a quantized weight that a new one may reuse."""
        gone = {id(qw) for key, qw in self.quantized.items() if key[0] == weight}
        gone |= {id(entry[0]) for key, entry in self.weights.items() if key[0] == weight}
        for packed in [k for k in self.packed if k[0] in gone]:
            del self.packed[packed]
        for cache in (self.weights, self.quantized):
            for key in [k for k in cache if k[0] == weight]:
                del cache[key]


def _weight_name(plan: NodePlan) -> str | None:
    """The name of the plan's weight input as planned (before its node is rewritten)."""
    if plan.weight_index is None or plan.weight_index >= len(plan.node.inputs):
        return None
    return plan.node.inputs[plan.weight_index].name


def _apply_one(graph, plan, ranges, options, state: _Written, energies) -> dict[str, Any]:  # noqa: ANN001
    node, spec = plan.node, plan.spec
    weights, acts = state.weights, state.acts
    entry: dict[str, Any] = {"node": node.name, "op": node.op}
    if spec.pinned:  # set by hand in the config (op_types / nodes): an automatic search keeps it
        entry["pinned"] = list(spec.pinned)
    qw = None
    a = spec.activations
    dynamic_tensor = a is not None and a.granularity.kind == "dynamic"
    if dynamic_tensor and spec.weights is not None and plan.weight_index is not None and options.emit == "qdq":
        w = node.inputs[plan.weight_index]
        qw = _quantized(plan, options, state, energies)
        done = emit_dynamic_tensor(graph, node, qw)
        if not isinstance(done, str):
            plan.node = done
            stored = stored_as(spec.weights.dtype, qw.storage, qw.codes)
            entry["weights"] = weight_record(w.name, qw, stored)
            entry["activations"] = {
                "tensor": node.inputs[0].name if node.inputs else "",
                "dtype": "uint8",
                "granularity": "dynamic",
                "symmetric": False,
                "dynamic": True,
                "computed": "DynamicQuantizeLinear: one uint8 scale per tensor at run time",
            }
            return entry
        entry["note"] = f"{done}: per-token dynamic int8 activations instead"
        spec = plan.spec = NodeSpec(spec.weights, TensorSpec("int8", Granularity("token"), True, "minmax"))
    if spec.weights is not None and plan.weight_index is not None and _wants_matmulnbits(plan, options):
        w = node.inputs[plan.weight_index]
        qw = _quantized(plan, options, state, energies)
        written = _emit_matmulnbits(graph, plan, qw, options, state.packed)
        if written is not None:
            entry["weights"] = weight_record(w.name, qw, written)
            entry["kernel"] = "MatMulNBits"
            return entry
    if spec.weights is not None and plan.weight_index is not None:
        w = node.inputs[plan.weight_index]
        key = (w.name, spec.weights, plan.layout)
        if key not in weights:
            qw = _quantized(plan, options, state, energies)  # one quantization per weight, whatever the form
            floor = _bias_scale_floor(plan, options, ranges)
            if floor is not None:
                qw, raised = raise_scales(ir.constant_value(w), qw, floor)  # type: ignore[arg-type]
                if raised:
                    state.quantized[key] = qw
                    entry["bias_overflow"] = {
                        "channels": raised,
                        "fix": "weight scale raised so that the int32 bias fits",
                    }
            if options.emit == "qdq":
                out = _emit_weight(graph, w, qw, plan, options.float_weight_format)
                stored = stored_as(spec.weights.dtype, qw.storage, qw.codes)
            else:
                out = ir.make_constant(ir.unique_name(graph, f"{w.name}_fakequant"), qw.dequantized)
                stored = "float (simulation)"
            weights[key] = (qw, out, stored)
        qw, out, stored = weights[key]
        node.inputs[plan.weight_index] = out
        entry["weights"] = weight_record(key[0], qw, stored)
    a = spec.activations
    if a is not None:
        if a.granularity.kind == "dynamic":  # the simulation of the fused pattern (the deploy form returned above)
            x = node.inputs[0]
            node.inputs[0] = emit_dynamic_fake_quant(graph, x, f"{x.name}_{node.name}")
            entry["activations"] = {"tensor": x.name, "dtype": "uint8", "granularity": "dynamic", "dynamic": True}
        elif a.granularity.kind == "token":
            x = node.inputs[0]
            conv = node.op in ("Conv", "ConvTranspose")
            axis = 1 if conv else (0 if node.op == "Gemm" and node.attrs.get("transA", 0) else -1)  # reduction axis
            where = "channels of each position" if conv else "the last axis"
            shared = (x.name, a.dtype, axis)
            if shared in state.emulated and a.dtype in ("mxfp8", "hif8"):  # the same values for every reader
                node.inputs[0] = state.emulated[shared]
                how = f"dynamic, {'32-blocks' if a.dtype == 'mxfp8' else 'one scale per vector'} along {where}"
            elif a.dtype == "mxfp8":
                node.inputs[0] = state.emulated[shared] = emit_mx_activation(
                    graph,
                    x,
                    _reduction_length(x, node, plan),
                    a.dtype,
                    f"{x.name}_{node.name}_mx",
                    axis,
                    len(plan.weight_shape),
                )
                how = f"dynamic 32-blocks along {where}"
            elif a.dtype == "hif8":
                node.inputs[0] = state.emulated[shared] = emit_hif8_activation(
                    graph, x, None, f"{x.name}_{node.name}_hif8", axis
                )
                how = f"dynamic, one scale per vector along {where}"
            else:
                emit_dynamic_per_token(graph, node, 0, a.dtype, axis)
                how = f"dynamic, one scale per vector along {where}"
            entry["activations"] = {
                "tensor": x.name,
                "dtype": a.dtype,
                "granularity": "token",
                "symmetric": True,
                "dynamic": True,
                "computed": how,
            }
        else:
            entry["activations"] = [_quantize_activation(graph, t, a, ranges, acts) for t in plan.activation_inputs]
            entry["outputs"] = [_quantize_activation(graph, t, a, ranges, acts) for t in plan.activation_outputs]
    if (
        options.emit == "qdq"
        and options.bias_int32
        and plan.bias_index is not None
        and qw is not None
        and node.op in ("Conv", "Gemm")
        and _int8_pair(plan)
        and plan.activation_inputs
        and float(node.attrs.get("alpha", 1.0)) == 1.0
        and float(node.attrs.get("beta", 1.0)) == 1.0
    ):
        x_scale = acts[plan.activation_inputs[0].name]["scale"]
        bias_value = ir.constant_value(node.inputs[plan.bias_index])
        assert bias_value is not None  # plan_nodes sets bias_index only for a constant bias
        bias = bias_value.astype(np.float32)
        if bias.ndim == 1:
            emit_bias_int32(graph, node, plan.bias_index, bias, x_scale, qw.scale)
            entry["bias"] = "int32"
    return entry


#: Largest |int32 bias code| allowed: half of int32, leaving room for bias correction's shifts.
_BIAS_CODE_LIMIT = float(2**30)


def _bias_scale_floor(plan: NodePlan, options: Any, ranges: dict[str, tuple[float, float]]) -> np.ndarray | None:
    """Per-channel minimum weight scale so that ``round(b / (s_x s_w))`` fits the int32 bias, or None.

    Only fully INT8 Conv/Gemm layers get an int32 bias (:func:`_apply_one`); a channel whose
    weight scale is tiny (dead or pruned channel) with a non-zero bias would overflow it.
    """
    node, spec = plan.node, plan.spec
    if not (
        options.emit == "qdq"
        and options.bias_int32
        and plan.bias_index is not None
        and node.op in ("Conv", "Gemm")
        and _int8_pair(plan)
        and plan.activation_inputs
        and plan.activation_inputs[0].name in ranges
    ):
        return None
    assert spec.activations is not None
    bias = ir.constant_value(node.inputs[plan.bias_index])
    if bias is None or bias.ndim != 1:
        return None
    lo, hi = ranges[plan.activation_inputs[0].name]
    x_scale = float(np.asarray(activation_qparams(spec.activations.dtype, lo, hi, spec.activations.symmetric)[0]))
    return (np.abs(bias.astype(np.float64)) / (x_scale * _BIAS_CODE_LIMIT)).astype(np.float32)


def _quantized(plan: NodePlan, options: Any, state: _Written, energies: dict[str, np.ndarray]) -> QuantizedWeight:
    """The node's weight quantized by its spec (once per weight and spec)."""
    assert plan.spec.weights is not None and plan.weight_index is not None and plan.layout is not None  # callers check
    w = plan.node.inputs[plan.weight_index]
    key = (w.name, plan.spec.weights, plan.layout)
    if key not in state.quantized:
        value = ir.constant_value(w)
        assert value is not None  # plan_nodes declines nodes whose weight is not a constant
        hessian = state.hessians.get(plan.node.name)
        energy = energies.get(plan.node.name)
        if hessian is None:
            state.quantized[key] = quantize_weight(
                value, plan.spec.weights, plan.layout, w.name, options.fp4_storage, energy
            )
        else:
            qw = gptq_quantize(
                value,
                plan.spec.weights,
                plan.layout,
                hessian,
                name=w.name,
                fp4_storage=options.fp4_storage,
                act_order=options.act_order,
                damp=options.gptq_damp,
                input_energy=energy,
            )
            qw.algorithm = {"name": "gptq", "act_order": options.act_order, "damp": options.gptq_damp}
            state.quantized[key] = qw
    return state.quantized[key]


def _wants_matmulnbits(plan: NodePlan, options: Any) -> bool:
    """Weight-only MatMul/Gemm for onnxruntime: written as MatMulNBits (``weight_only_format``)."""
    return (
        options.emit == "qdq"
        and options.weight_only_format == "matmulnbits"
        and plan.spec.activations is None
        and plan.node.op in ("MatMul", "Gemm")
        and len(plan.weight_shape) == 2
    )


def _emit_matmulnbits(
    graph: ir.Graph,
    plan: NodePlan,
    qw: QuantizedWeight,
    options: Any,
    packed_weights: dict[tuple[int, bool], list[ir.Tensor]],
) -> str | None:
    """Replace the node by MatMulNBits (folding a bias); its storage description, or None if it has no such form."""
    node = plan.node
    attrs = node.attrs
    if node.op == "Gemm" and (attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0):
        return None
    transposed = node.op == "Gemm" and bool(attrs.get("transB", 0))
    packed = pack_weight(qw, transposed)
    if isinstance(packed, str):
        return None
    bias: np.ndarray | None = None
    output = node.outputs[0]
    fused_add = None
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        c = ir.constant_value(node.inputs[2])
        if c is None or c.size != packed.n or float(attrs.get("beta", 1.0)) != 1.0:
            return None
        bias = c.astype(np.float32).reshape(-1)
    elif node.op == "MatMul":
        found = bias_add(graph, node, packed.n)
        if found is not None:
            fused_add, bias = found
            output = fused_add.outputs[0]
    key = (id(qw), transposed)
    if key not in packed_weights:  # a weight several nodes read is stored once
        packed_weights[key] = weight_constants(graph, packed, node.inputs[plan.weight_index or 1].name)
    level = options.matmulnbits_accuracy_level
    plan.node = emit_matmulnbits(graph, node, packed, packed_weights[key], bias, output, level)
    if fused_add is not None:
        fused_add.inputs.clear()
        fused_add.outputs.clear()
    signed = "" if qw.codes.dtype.name.startswith("u") else f", signed codes + {1 << (packed.bits - 1)}"
    folded = " + bias" if bias is not None else ""
    return f"MatMulNBits {packed.bits}-bit, block {packed.block_size}{signed}{folded}"


def _emit_weight(graph: ir.Graph, w: ir.Tensor, qw: QuantizedWeight, plan: NodePlan, float_form: str) -> ir.Tensor:
    if float_form == "cast" and folds_at_load(qw):  # FP8 / MXFP8 codes that onnxruntime decodes once, at load
        return emit_cast_weight(graph, w, qw)
    fmt = get_format(qw.spec.dtype)
    elem = fmt.element if hasattr(fmt, "element") else fmt
    if qw.storage == "lut":
        assert isinstance(elem, ElementFormat) and plan.layout is not None
        return emit_lut_weight(graph, w, qw, elem, plan.layout)
    if qw.storage == "dq2":
        assert plan.layout is not None
        return emit_two_level_weight(graph, w, qw, plan.layout)
    if qw.storage == "lut_dq":
        assert isinstance(elem, ElementFormat)
        return emit_lut_dq_weight(graph, w, qw, elem)
    return emit_weight_dq(graph, w, qw)


def _reduction_length(x: ir.Tensor, node: ir.Node, plan: NodePlan) -> int:
    """Length of the input's reduction axis, from the weight (K, or Cin of a Conv)."""
    if plan.layout is not None and (node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transA", 0))):
        return int(plan.weight_shape[plan.layout.reduction_axis])
    if node.op == "Conv":
        return int(plan.weight_shape[1]) * int(node.attrs.get("group", 1))
    if node.op == "ConvTranspose":
        return int(plan.weight_shape[0])
    shape = x.shape
    if not shape or not isinstance(shape[-1], int) or shape[-1] <= 0:
        raise ConfigError(
            f"node {node.name!r}: MX activations need a static last dimension, but input {x.name!r} has shape {shape}"
        )
    return int(shape[-1])


def _quantize_activation(graph, tensor, spec: TensorSpec, ranges, acts) -> dict[str, Any]:  # noqa: ANN001
    name = tensor.name
    if name not in acts:
        lo, hi = ranges[name]
        scale, zp = activation_qparams(spec.dtype, lo, hi, spec.symmetric)
        emit_static_activation(graph, tensor, spec.dtype, scale, zp)
        zp_value = zp.astype(np.float32) if zp.dtype.kind not in "iu" else zp
        acts[name] = {
            "tensor": name,
            "dtype": spec.dtype,
            "granularity": "tensor",
            "symmetric": spec.symmetric,
            "observer": spec.observer,
            "range": [lo, hi],
            "scale": float(np.asarray(scale).reshape(-1)[0]),
            "zero_point": float(np.asarray(zp_value).reshape(-1)[0]),
        }
    return acts[name]
