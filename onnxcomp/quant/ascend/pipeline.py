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

from onnxcomp import ir
from onnxcomp.calibration.collect import collect_many
from onnxcomp.calibration.observers import make_observer
from onnxcomp.errors import CalibrationError, ConfigError
from onnxcomp.framework.base import PassContext, PassResult
from onnxcomp.framework.manager import convert_opset
from onnxcomp.quant.apply import ranges_from
from onnxcomp.quant.ascend.balance import balance_factors, weight_snapshot
from onnxcomp.quant.ascend.emit import emit_deploy, emit_fake_quant
from onnxcomp.quant.ascend.layers import (
    ACTIVATION_TYPES,
    ASCEND_OPS,
    WEIGHT_TYPES,
    AscendLayer,
    activation_qparams,
    constraint_reason,
    format_reason,
    make_layer,
)
from onnxcomp.quant.ascend.record import record_text
from onnxcomp.quant.plan import NodePlan, plan_nodes
from onnxcomp.quant.spec import DEFAULT_OPS, QuantConfig, TensorSpec

#: The ai.onnx opsets ATC registers the Ascend ops for.
MIN_OPSET, MAX_OPSET = 8, 22
DEPLOY_KEY = "deploy_model"
RECORD_KEY = "record.txt"


@dataclass(frozen=True)
class AscendOptions:
    int4: bool = False  # --ascend-int4: INT4 weights where the config asks for int4 (UNVERIFIED layout)
    s19: bool = False  # AMCT's FORCE_FP16_QUANT: deq factors truncated to 19 significant bits
    calib_batches: int | None = None

    @classmethod
    def from_pass(cls, options: Any) -> AscendOptions:
        """From the quantize pass options; a one-line error for an option this target does not carry out."""
        unsupported = [
            flag
            for flag, used in (
                ("--accuracy-target", options.accuracy_target is not None),
                ("--sensitivity", options.sensitivity),
                ("--weight-algorithm gptq", options.weight_algorithm == "gptq"),
                ("--bias-correction", options.bias_correction != "none"),
                ("--quantize-embeddings", options.embeddings not in ("none", None)),
                ("--emit simulate", options.emit == "simulate"),
            )
            if used
        ]
        if unsupported:
            raise ConfigError(
                f"--target ascend does not support {', '.join(unsupported)} yet; drop it "
                "(the fake-quant model OUT.fake_quant.onnx is the simulation)"
            )
        return cls(int4=options.ascend_int4, calib_batches=options.calib_batches)


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


def _convert_down(graph: ir.Graph, template: Any) -> None:
    """Rewrite ``graph`` in place at opset 22 (onnx's version converter; its error says to re-export)."""
    why = f"ATC registers the Ascend ops for ai.onnx opsets {MIN_OPSET}..{MAX_OPSET}"
    converted = ir.import_model(convert_opset(ir.export_model(graph, template), MAX_OPSET, why))
    # the pass manager holds this graph object: it takes over the converted graph's state
    graph.__dict__.clear()
    graph.__dict__.update(converted.__dict__)


def _act_spec(spec: TensorSpec) -> TensorSpec:
    """The config's activation spec on the signed grid AscendQuant writes (uint8 -> int8 with offset_d)."""
    dtype = "int16" if ACTIVATION_TYPES[spec.dtype] == "INT16" else "int8"
    return TensorSpec(dtype, spec.granularity, spec.symmetric, spec.observer, spec.observer_options)


def _bias(plan: NodePlan) -> np.ndarray | None:
    if plan.bias_index is None:
        return None
    value = ir.constant_value(plan.node.inputs[plan.bias_index])
    return None if value is None else np.asarray(value, np.float64)


def ascend_quantize(
    graph: ir.Graph,
    ctx: PassContext,
    config: QuantConfig,
    options: AscendOptions,
    result: PassResult,
    migrate: Callable[[], dict[str, list[dict[str, Any]]]] | None = None,
) -> list[AscendLayer]:
    """Quantize ``graph`` for ATC: rewrite it into the fake-quant model, put the deploy model and record in ``ctx``.

    ``migrate`` runs the quantizer's scale migration (equalization, SmoothQuant) on ``graph``
    after the opset check; the SmoothQuant factors go to the record's ``tensor_balance_factor``.
    """
    opset = ir.default_opset(graph)
    if opset > MAX_OPSET:
        if ctx.source_model is None:
            raise ConfigError(f"--target ascend: opset {opset} > {MAX_OPSET} and no source model to convert")
        _convert_down(graph, ctx.source_model)
        result.notes.append(f"converted opset {opset} -> {MAX_OPSET} (ATC registers the Ascend ops for 8..22)")
    check_formats(config, options.int4)
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
    if not accepted:
        result.notes.append("no node to quantize for ATC")
        return []
    static: dict[str, TensorSpec] = {}
    for plan, act, _ in accepted:
        static.setdefault(plan.node.inputs[0].name, act)
    if ctx.calibration is None or ctx.source_model is None:
        raise CalibrationError(
            "--target ascend: static INT8/INT16 activations need calibration data: pass --calib DATA"
        )
    factories = {
        name: partial(make_observer, spec.observer, **{k: v for k, v in spec.options().items() if k == "num_bins"})
        for name, spec in static.items()
    }
    float_model = ir.export_model(graph, ctx.source_model)
    stats = collect_many(
        float_model, {"ranges": factories}, ctx.calibration(), options.calib_batches, ctx.progress.enabled
    )
    ranges = ranges_from(static, stats["ranges"])
    layers: list[AscendLayer] = []
    for plan, act, weight in accepted:
        name = plan.node.inputs[0].name
        act_type = ACTIVATION_TYPES[act.dtype]
        scale_d, offset_d = activation_qparams(act_type, *ranges[name], act.symmetric, name)
        assert plan.spec.weights is not None
        layer = make_layer(
            plan.node, weight, _bias(plan), (act_type, scale_d, offset_d), plan.spec.weights, options.s19
        )
        if isinstance(layer, str):
            result.declined.append((plan.node.name, layer))
            continue
        if plan.node.name in smoothed and plan.node.name in before:
            layer.balance = balance_factors(plan.node, before[plan.node.name])
        layers.append(layer)
    if not layers:
        return []
    deploy = ir.import_model(float_model)
    emit_deploy(deploy, layers)
    ir.finalize(deploy)
    ctx.artifacts[DEPLOY_KEY] = ir.export_model(deploy, ctx.source_model)
    emit_fake_quant(graph, layers)
    ctx.artifacts[RECORD_KEY] = record_text(layers)
    ctx.set_record("quant", layer_entries(layers))
    result.data.update(deploy_model=ctx.artifacts[DEPLOY_KEY], record=ctx.artifacts[RECORD_KEY], layers=layers)
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
        }
        for layer in layers
    ]
