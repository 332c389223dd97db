"""``quantize --target ascend``: plan, pre-check ATC's constraints, calibrate, write both models and the record.

The pass's own graph becomes the fake-quant model (standard ops: the pass manager validates it
on onnxruntime); the deploy model, which onnxruntime cannot load, is built from a copy of the
same float graph and handed to the API as ``ctx.artifacts["deploy_model"]`` (written as
``OUT.onnx``; the fake-quant model goes to ``OUT.fake_quant.onnx``), the record as
``ctx.artifacts["record.txt"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.calibration.collect import collect_many
from onnxcomp.calibration.observers import make_observer
from onnxcomp.errors import CalibrationError, ConfigError
from onnxcomp.framework.base import PassContext, PassResult
from onnxcomp.framework.manager import convert_opset
from onnxcomp.quant.ascend.balance import balance_factors, weight_snapshot
from onnxcomp.quant.ascend.bias import correct_biases, output_means
from onnxcomp.quant.ascend.emit import emit_deploy, emit_fake_quant
from onnxcomp.quant.ascend.float16 import float16_to_float32, is_float16_model
from onnxcomp.quant.ascend.layers import (
    ACTIVATION_TYPES,
    ASCEND_OPS,
    WEIGHT_TYPES,
    AscendLayer,
    activation_qparams,
    constraint_reason,
    format_reason,
    layer_layout,
    make_layer,
    make_pool_layer,
    matmul_bias_add,
    pool_reason,
    weight_spec,
)
from onnxcomp.quant.ascend.learned import Learner, weight_quantizer
from onnxcomp.quant.ascend.record import record_text
from onnxcomp.quant.plan import NodePlan, plan_nodes
from onnxcomp.quant.spec import DEFAULT_OPS, NodeSpec, QuantConfig, TensorSpec
from onnxcomp.quant.statistics import hessian_factories, hessians_from, ranges_from

#: The ai.onnx opsets ATC registers the Ascend ops for.
MIN_OPSET, MAX_OPSET = 8, 22
DEPLOY_KEY = "deploy_model"
RECORD_KEY = "record.txt"


@dataclass(frozen=True)
class AscendOptions:
    int4: bool = False  # --ascend-int4: INT4 weights where the config asks for int4 (UNVERIFIED layout)
    s19: bool = False  # AMCT's FORCE_FP16_QUANT: deq factors truncated to 19 significant bits
    calib_batches: int | None = None
    gptq: bool = False  # --weight-algorithm gptq: codes by GPTQ on the round-to-nearest grid
    act_order: bool = False
    gptq_damp: float = 0.01
    gram_rows: int = 4096
    bias_correction: str = "none"  # none | full | fast: moved into the int32 bias (onnxcomp/quant/ascend/bias.py)
    avgpool: bool = False  # AveragePool quantized too (UNVERIFIED integer semantics, docs/ascend.md)

    @property
    def gptq_settings(self) -> tuple[bool, float]:
        return self.act_order, self.gptq_damp

    @classmethod
    def from_pass(cls, options: Any) -> AscendOptions:
        """From the quantize pass options; a one-line error for an option this target does not carry out."""
        unsupported = [
            (flag, why)
            for flag, used, why in (
                (
                    "--quantize-embeddings",
                    options.embeddings not in ("none", None),
                    "ATC quantizes no Gather tables",
                ),
                ("--emit simulate", options.emit == "simulate", "OUT.fake_quant.onnx is the simulation"),
            )
            if used
        ]
        if unsupported:
            flags = ", ".join(flag for flag, _ in unsupported)
            raise ConfigError(f"--target ascend does not support {flags} ({unsupported[0][1]}); drop it")
        return cls(
            int4=options.ascend_int4,
            calib_batches=options.calib_batches,
            gptq=options.weight_algorithm == "gptq",
            act_order=options.act_order,
            gptq_damp=options.gptq_damp,
            gram_rows=options.gram_rows,
            bias_correction=options.bias_correction,
            avgpool=options.ascend_avgpool,
        )


def check_formats(config: QuantConfig, int4: bool) -> None:
    """A one-line error for a format with no Ascend deploy form (HiFloat8, FP8, MX, FP4, ...)."""
    specs = [("weights", config.weights), ("activations", config.activations)]
    for w, a in [*config.by_op.values(), *config.by_name.values()]:
        specs += [("weights", w), ("activations", a)]
    for role, spec in specs:
        if not isinstance(spec, TensorSpec):
            continue
        why = format_reason(spec.dtype, role)
        if why is not None:
            raise ConfigError(f"--target ascend: {why}")
        if role == "activations" and spec.granularity.kind != "tensor":
            raise ConfigError(
                f"--target ascend: activations are quantized per tensor with static ranges for ATC, not "
                f"{spec.granularity}; drop --dynamic / the activation granularity"
            )
        if role == "weights" and WEIGHT_TYPES[spec.dtype] == "INT4" and not int4:
            raise ConfigError(
                "--target ascend: INT4 weights use a packing ATC's documentation does not confirm; "
                "pass --ascend-int4 to write it anyway"
            )


def _name_nodes(graph: ir.Graph) -> int:
    """Give every top-level node a unique non-empty name (record keys, ``<layer>.quant``); returns how many changed."""
    seen: set[str] = set()
    changed = 0
    for node in graph.nodes:
        if not node.name or node.name in seen:
            node.name = ir.unique_name(graph, node.name or node.op)
            changed += 1
        seen.add(node.name)
    return changed


def _replace(graph: ir.Graph, model: onnx.ModelProto) -> None:
    """``graph`` becomes ``model``'s graph in place (the pass manager holds this graph object)."""
    converted = ir.import_model(model)
    graph.__dict__.clear()
    graph.__dict__.update(converted.__dict__)


def _convert_down(graph: ir.Graph, template: Any) -> None:
    """Rewrite ``graph`` in place at opset 22 (onnx's version converter; its error says to re-export)."""
    why = f"ATC registers the Ascend ops for ai.onnx opsets {MIN_OPSET}..{MAX_OPSET}"
    _replace(graph, convert_opset(ir.export_model(graph, template), MAX_OPSET, why))


def _float16_to_float32(graph: ir.Graph, template: Any, result: PassResult) -> None:
    """A float16 model computes in float32 from here on (onnxcomp/quant/ascend/float16.py), or a one-line error."""
    model = ir.export_model(graph, template)
    if not is_float16_model(model):
        return
    converted = float16_to_float32(model)
    if isinstance(converted, str):
        raise ConfigError(f"--target ascend: {converted}")
    _replace(graph, converted)
    result.notes.append(
        "float16 model: computed in float32 (what ATC takes), float16 inputs and outputs kept through Casts"
    )


def _act_spec(spec: TensorSpec) -> TensorSpec:
    """The config's activation spec on the signed grid AscendQuant writes (uint8 -> int8 with offset_d)."""
    dtype = "int16" if ACTIVATION_TYPES[spec.dtype] == "INT16" else "int8"
    return TensorSpec(dtype, spec.granularity, spec.symmetric, spec.observer, spec.observer_options)


def _pools(graph: ir.Graph, config: QuantConfig, result: PassResult) -> list[tuple[ir.Node, TensorSpec]]:
    """The AveragePools to quantize (``ascend_avgpool``; skip list and overrides apply) with their activation spec."""
    with_pools = replace(config, ops=(*config.ops, "AveragePool"))
    found = []
    for node in ir.iter_nodes(graph, ("AveragePool",)):
        spec = with_pools.for_node(node.name, node.op)
        if spec is None or spec.activations is None:
            continue
        if spec.activations.dtype not in ACTIVATION_TYPES or spec.activations.granularity.kind != "tensor":
            continue  # check_formats has refused these already
        act = _act_spec(spec.activations)
        why = pool_reason(node, ACTIVATION_TYPES[act.dtype])
        if why is not None:
            result.declined.append((node.name, why))
            continue
        found.append((node, act))
    return found


def _bias(graph: ir.Graph, plan: NodePlan, wts_type: str) -> tuple[np.ndarray | None, str | None]:
    """The layer's float bias (input 2, or a MatMul's bias Add) and the name of that Add, if any."""
    add = matmul_bias_add(graph, plan.node, wts_type)
    if add is not None:
        return np.asarray(add[1], np.float64), add[0].name
    if plan.bias_index is None:
        return None, None
    value = ir.constant_value(plan.node.inputs[plan.bias_index])
    return (None if value is None else np.asarray(value, np.float64)), None


def _measured(graph: ir.Graph, plan: NodePlan, wts_type: str) -> str:
    """The tensor whose channel means bias correction compares: the layer's output, or its bias Add's."""
    add = matmul_bias_add(graph, plan.node, wts_type)
    return str((add[0] if add is not None else plan.node).outputs[0].name)


def ascend_quantize(
    graph: ir.Graph,
    ctx: PassContext,
    config: QuantConfig,
    options: AscendOptions,
    result: PassResult,
    migrate: Callable[[], dict[str, list[dict[str, Any]]]] | None = None,
    learn: Learner | None = None,
    collect: Callable[[Any, dict[str, dict[str, Any]]], dict[str, dict[str, Any]]] | None = None,
) -> list[AscendLayer]:
    """Quantize ``graph`` for ATC: rewrite it into the fake-quant model, put the deploy model and record in ``ctx``.

    ``migrate`` runs the quantizer's scale migration (equalization, SmoothQuant) on ``graph``
    after the opset check; the SmoothQuant factors go to the record's ``tensor_balance_factor``.
    ``learn`` (the ``distill`` pass) learns weights, scales and biases on the Ascend grid first;
    GPTQ and bias correction come from ``options``. ``collect`` gathers the calibration statistics
    (the pass's, which reuses them across the candidates of an accuracy search; default one pass).
    """
    opset = ir.default_opset(graph)
    if opset > MAX_OPSET:
        if ctx.source_model is None:
            raise ConfigError(f"--target ascend: opset {opset} > {MAX_OPSET} and no source model to convert")
        _convert_down(graph, ctx.source_model)
        result.notes.append(f"converted opset {opset} -> {MAX_OPSET} (ATC registers the Ascend ops for 8..22)")
    check_formats(config, options.int4)
    if ctx.source_model is not None:
        _float16_to_float32(graph, ctx.source_model, result)
    renamed = _name_nodes(graph)
    if renamed:
        result.notes.append(f"named {renamed} unnamed or duplicate-named nodes (the record is keyed by node name)")
    if config.ops == DEFAULT_OPS:  # ATC also quantizes ConvTranspose, which onnxruntime has no integer kernel for
        config = replace(config, ops=ASCEND_OPS)
    before = weight_snapshot(graph, config.ops) if migrate is not None else {}
    migrated = migrate() if migrate is not None else {}
    smoothed = {e["node"] for e in migrated.get("smoothquant", []) if "node" in e}
    plans, declined = plan_nodes(graph, config, output_quant=False, placement="all")
    result.declined.extend(declined)
    accepted: list[tuple[NodePlan, TensorSpec, np.ndarray]] = []
    for plan in plans:
        spec = plan.spec
        weight = ir.constant_value(plan.node.inputs[1])
        assert weight is not None  # plan_nodes folds the weight into input 1
        if spec.activations is None or spec.weights is None:
            result.declined.append(
                (plan.node.name, "weight-only or activation-only quantization has no ATC deploy form; it stays float")
            )
            continue
        why = constraint_reason(
            graph, plan.node, weight, ACTIVATION_TYPES[spec.activations.dtype], WEIGHT_TYPES[spec.weights.dtype]
        )
        if why is not None:
            result.declined.append((plan.node.name, why))
            continue
        accepted.append((plan, _act_spec(spec.activations), weight))
    pools = _pools(graph, config, result) if options.avgpool else []
    if not accepted and not pools:
        result.notes.append("no node to quantize for ATC")
        return []
    # read off the weights before distillation rewrites any bias (balance_factors solves through the bias ratio)
    balance = {
        plan.node.name: balance_factors(plan.node, before[plan.node.name])
        for plan, _, _ in accepted
        if plan.node.name in smoothed and plan.node.name in before
    }
    ascend_plans = [
        replace(
            plan, spec=NodeSpec(weight_spec(plan.node.op, plan.spec.weights), act), layout=layer_layout(plan.node, w)
        )
        for plan, act, w in accepted
        if plan.spec.weights is not None
    ]
    static: dict[str, TensorSpec] = {}
    for plan, act, _ in accepted:
        static.setdefault(plan.node.inputs[0].name, act)
    for node, act in pools:
        static.setdefault(node.inputs[0].name, act)
    if ctx.calibration is None or ctx.source_model is None:
        raise CalibrationError(
            "--target ascend: static INT8/INT16 activations need calibration data: pass --calib DATA"
        )
    float_graph = ir.import_model(ir.export_model(graph, ctx.source_model))  # the float layers, by the same names
    ir.finalize(float_graph)
    float_model = ir.export_model(float_graph, ctx.source_model)
    wanted: dict[str, dict[str, Any]] = {
        "ranges": {
            name: partial(make_observer, spec.observer, **{k: v for k, v in spec.options().items() if k == "num_bins"})
            for name, spec in static.items()
        },
        "hessians": hessian_factories(ascend_plans, options.gram_rows, ctx.rng) if options.gptq else {},
        "means": output_means(
            [
                (_measured(graph, p, WEIGHT_TYPES[p.spec.weights.dtype]), p.node.op)
                for p in ascend_plans
                if p.spec.weights
            ]
        )
        if options.bias_correction != "none"
        else {},
    }
    if collect is None:
        stats = collect_many(float_model, wanted, ctx.calibration(), options.calib_batches, ctx.progress.enabled)
    else:
        stats = collect(float_model, wanted)
    ranges = ranges_from(static, stats["ranges"])
    hessians = hessians_from(stats["hessians"])
    learned, learn_notes = learn(graph, ascend_plans, ranges, float_model, ctx, {}) if learn is not None else ({}, {})
    if learned:  # distillation wrote learned biases into ``graph``, also into nodes after a layer (BatchNormalization)
        float_model = ir.export_model(graph, ctx.source_model)
    layers: list[AscendLayer] = []
    for plan, act, weight in accepted:
        name = plan.node.inputs[0].name
        act_type = ACTIVATION_TYPES[act.dtype]
        scale_d, offset_d = activation_qparams(act_type, *ranges[name], act.symmetric, name)
        assert plan.spec.weights is not None
        quantizer = weight_quantizer(plan.node.name, options.gptq_settings, hessians, learned)
        bias, bias_add = _bias(graph, plan, WEIGHT_TYPES[plan.spec.weights.dtype])
        layer = make_layer(
            plan.node, weight, bias, (act_type, scale_d, offset_d), plan.spec.weights, options.s19, quantizer
        )
        if isinstance(layer, str):
            result.declined.append((plan.node.name, layer))
            continue
        layer.bias_add = bias_add
        layer.balance = balance.get(plan.node.name)
        if plan.node.name in learn_notes:
            layer.notes["distill"] = learn_notes[plan.node.name]
        layers.append(layer)
    for node, act in pools:
        act_type = ACTIVATION_TYPES[act.dtype]
        name = node.inputs[0].name
        layers.append(
            make_pool_layer(node, (act_type, *activation_qparams(act_type, *ranges[name], act.symmetric, name)))
        )
    if not layers:
        return []
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    layers.sort(key=lambda layer: order[layer.node])  # graph order: records, shared AscendQuant names
    if options.bias_correction != "none":
        done = correct_biases(
            float_graph,
            float_model,
            layers,
            stats["means"],
            ctx.calibration,
            options.bias_correction,
            options.calib_batches,
            ctx.progress.enabled,
        )
        for layer in layers:
            layer.notes["bias_correction"] = done[layer.node]
        result.stats["bias_corrected"] = sum("site" in entry for entry in done.values())
    if learned:
        result.stats["distilled"] = len(learned)
    if options.gptq:
        result.stats["gptq"] = sum(layer.node in hessians for layer in layers)
    deploy = ir.import_model(float_model)
    emit_deploy(deploy, layers)
    ir.finalize(deploy)
    ctx.artifacts[DEPLOY_KEY] = ir.export_model(deploy, ctx.source_model)
    emit_fake_quant(graph, layers)
    ctx.artifacts[RECORD_KEY] = record_text(layers)
    entries = layer_entries(layers)  # one list: what the accuracy search attaches to it lands in the JSON record
    ctx.set_record("quant", entries)
    result.data.update(
        deploy_model=ctx.artifacts[DEPLOY_KEY], record=entries, record_text=ctx.artifacts[RECORD_KEY], layers=layers
    )
    result.modified = True
    result.changed += [layer.node for layer in layers]
    for layer in layers:
        result.stats[layer.op] = result.stats.get(layer.op, 0) + 1
    result.stats["nodes"] = len(layers)
    return layers


def layer_entries(layers: list[AscendLayer]) -> list[dict[str, Any]]:
    """The JSON quant record of an Ascend run (the protobuf record holds the same factors)."""
    return [
        {
            "node": layer.node,
            "op": layer.op,
            "target": "ascend",
            "act_type": layer.act_type,
            "wts_type": layer.wts_type,
            "scale_d": float(layer.scale_d),
            "offset_d": layer.offset_d,
            "scale_w": [float(s) for s in layer.scale_w],
            "bias_int32": layer.bias is not None,
            **layer.notes,
        }
        for layer in layers
    ]
