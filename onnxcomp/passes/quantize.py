"""quantize: post-training quantization of Conv, ConvTranspose, Gemm and MatMul.

Weights are quantized offline from their values; static activations get per-tensor ranges from
calibration data streamed through one onnxruntime session; dynamic (per-token) activations get a
run-time subgraph. The graph is written the way onnxruntime fuses it (``docs/onnxruntime.md#fused-patterns``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Literal

from onnxcomp import ir
from onnxcomp.analysis.kernels import kernel_report
from onnxcomp.calibration.channels import ChannelStats
from onnxcomp.calibration.collect import Calibrator, collect_many
from onnxcomp.errors import CalibrationError, ConfigError, RecipeError
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass
from onnxcomp.model_io import runs_on_ort
from onnxcomp.quant.apply import apply_plans
from onnxcomp.quant.ascend.pipeline import AscendOptions, ascend_quantize
from onnxcomp.quant.ascend.qdq import ascend_qdq_options, check_float_inputs
from onnxcomp.quant.bias_correction import correct_layer_biases, output_mean_factories
from onnxcomp.quant.embeddings import quantize_embeddings
from onnxcomp.quant.equalize import equalize
from onnxcomp.quant.fallback import AccuracyTarget, parse_target
from onnxcomp.quant.migration import smooth_targets
from onnxcomp.quant.plan import NodePlan, plan_nodes
from onnxcomp.quant.record import attach_migrated
from onnxcomp.quant.report import quantization_report
from onnxcomp.quant.smooth import awq, smoothquant
from onnxcomp.quant.spec import (
    DEFAULT_OPS,
    NodeSpec,
    QuantConfig,
    TensorSpec,
    emulated_reason,
    parse_config,
    parse_embedding_spec,
)
from onnxcomp.quant.statistics import (
    energies_from,
    energy_factories,
    hessian_factories,
    hessians_from,
    needs_data,
    needs_statistics,
    plan_counts,
    range_factories,
    ranges_from,
    static_tensors,
)
from onnxcomp.quant.tuning import tuned_quantize
from onnxcomp.quant.weights import min_opset_for
from onnxcomp.runtime import file_backed


@register_pass
class Quantize(Pass):
    """Post-training quantization (weights offline, activations calibrated or dynamic).

    Rewrites each Conv/ConvTranspose/Gemm/MatMul with a constant float32 weight chosen by the
    config: weight -> quantized initializer + DequantizeLinear; static activations -> a
    QuantizeLinear/DequantizeLinear pair on the input (and, with ``output_quant``, on the output
    after a following Relu/Clip, so ORT fuses QLinearConv / QLinearMatMul); int32 bias for fully
    INT8 Conv/Gemm. ``emit = "simulate"`` writes fake-quantized float weights instead of DQ.
    Declines (with a reason) nodes whose weight is not a constant float32 tensor, is a 1-D
    MatMul operand, or is too short for its group size. Static activations need calibration data.
    """

    name = "quantize"

    @dataclass(frozen=True)
    class Options:
        RENAMED: ClassVar[dict[str, str]] = {"batch_num": "calib_batches"}
        weights: str | dict[str, Any] = "int8"
        activations: str | dict[str, Any] = "uint8"
        ops: tuple[str, ...] = DEFAULT_OPS
        skip: tuple[str, ...] = ()
        op_types: dict[str, Any] = field(default_factory=dict)
        nodes: dict[str, Any] = field(default_factory=dict)
        emit: Literal["qdq", "simulate"] = "qdq"
        fp4_storage: Literal["int8", "uint4_lut", "float4e2m1"] = "int8"
        output_quant: bool = True
        bias_int32: bool = True
        calib_batches: int | None = None  # calibration batches used (None: all)
        report_batches: int = 4
        embeddings: str | dict[str, Any] = "none"  # Gather tables: none, int8 (per row) or int4 (per group)
        # speed: leave convs that run faster in float on onnxruntime CPU unquantized; all: quantize every one
        placement: Literal["speed", "all"] = "speed"
        kernel_report: bool = True  # say which kernel onnxruntime runs for each quantized node
        # weight-only MatMul/Gemm: com.microsoft MatMulNBits (onnxruntime) or DequantizeLinear (any runtime)
        weight_only_format: Literal["matmulnbits", "dq"] = "matmulnbits"
        # FP8 / MXFP8 weights: cast (Cast(codes) * scale, decoded once by onnxruntime at load) or dq (any runtime)
        float_weight_format: Literal["cast", "dq"] = "cast"
        matmulnbits_accuracy_level: int = 4  # 4: int8 compute (onnxruntime's default); 0: float compute
        # subtract each layer's mean output error through its bias: full (level by level), fast (one pass)
        bias_correction: Literal["none", "full", "fast"] = "none"
        # how weights are rounded: rtn (nearest on the observer's grid), gptq (second-order error feedback)
        weight_algorithm: Literal["rtn", "gptq", "awq"] = "rtn"
        act_order: bool = False  # GPTQ: quantize input columns by decreasing activation energy
        gptq_damp: float = 0.01  # GPTQ: diagonal damping, relative to the mean of diag(X^T X)
        gram_rows: int = 4096  # GPTQ: design rows sampled per batch and layer (Conv positions)
        # migrate activation outliers into the weights: alpha in [0, 1], or "auto" (searched per layer)
        smoothquant: float | Literal["auto"] | None = None
        equalize: bool = False  # cross-layer equalization of Conv/Gemm pairs (exact in float) first
        smooth_rows: int = 512  # SmoothQuant auto / AWQ: calibration rows kept per tensor for the searches
        # "METRIC:VALUE" (cos, sqnr, agree, score, drop): the most compression meeting it (docs/accuracy.md)
        accuracy_target: str | None = None
        sensitivity: bool = False  # rank every node by the metric with only it quantized / only it in float
        evaluator: str | None = None  # FILE.py:FUNCTION scoring a model file (higher is better)
        eval_data: str | None = None  # data the metric runs on (default: the calibration data)
        eval_batches: int = 8  # evaluation batches per candidate
        trial_workers: int = 1  # sensitivity / search: candidates built and scored on this many threads
        # node overrides chosen by the accuracy search, applied after SmoothQuant/equalization
        fallback: dict[str, Any] = field(default_factory=dict)
        # ort: Q/DQ for onnxruntime; ascend: ATC's deploy model + fake-quant model + record (docs/ascend.md)
        target: Literal["ort", "ascend", "ascend-qdq"] = "ort"
        ascend_int4: bool = False  # --target ascend: allow INT4 weights (packing UNVERIFIED against ATC)
        ascend_avgpool: bool = False  # --target ascend: quantize AveragePool too (UNVERIFIED integer semantics)

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        if self.options.target == "ascend-qdq":  # AMCT convert_qat_model's constraints (docs/ascend.md)
            self.options = ascend_qdq_options(self.options)
        try:
            #: the config scale migration (SmoothQuant, AWQ, equalization) chooses with
            self.base_config: QuantConfig = parse_config(self._config_data())
            fallback = {**self.options.nodes, **self.options.fallback}
            #: the config nodes are quantized with: the base plus the accuracy search's fallback
            self.config: QuantConfig = (
                parse_config({**self._config_data(), "nodes": fallback}) if self.options.fallback else self.base_config
            )
            self.embeddings: TensorSpec | None = parse_embedding_spec(self.options.embeddings)
            self.target: AccuracyTarget | None = (
                parse_target(self.options.accuracy_target) if self.options.accuracy_target is not None else None
            )
        except ConfigError as exc:
            raise RecipeError(str(exc)) from exc
        #: statistics reused across the candidates of one search ((purpose, tensor, collector) -> collector)
        self.stats_cache: dict[tuple[str, str, str], Any] | None = None

    def _config_data(self) -> dict[str, Any]:
        o = self.options
        return {
            "weights": o.weights,
            "activations": o.activations,
            "ops": list(o.ops),
            "skip": list(o.skip),
            "op_types": o.op_types,
            "nodes": o.nodes,
        }

    def _specs(self) -> list[TensorSpec]:
        c = self.config
        specs = [c.weights, c.activations]
        for w, a in [*c.by_op.values(), *c.by_name.values()]:
            specs += [w, a]
        return [s for s in specs if isinstance(s, TensorSpec)]

    def min_opset(self) -> int | None:
        need = 23 if self.options.fp4_storage == "float4e2m1" else 13
        for spec in self._specs() + ([self.embeddings] if self.embeddings is not None else []):
            need = max(need, min_opset_for(spec))
        return need

    def _migrate_scales(self, graph: ir.Graph, ctx: PassContext, result: PassResult) -> dict[str, list[dict[str, Any]]]:
        """Equalization, SmoothQuant and AWQ: float-exact rescaling before anything is quantized."""
        o, done = self.options, {}
        config = self.base_config
        candidates = [n for n in ir.iter_nodes(graph, config.ops) if config.for_node(n.name, n.op) is not None]
        if o.equalize:
            done["equalize"] = equalize(graph, o.skip)
        specs = {n.name: config.for_node(n.name, n.op) for n in candidates}
        smooth = [n for n in candidates if (sp := specs[n.name]) is not None and sp.activations is not None]
        weight_only = [n for n in candidates if (sp := specs[n.name]) is not None and sp.activations is None]
        wanted = (smooth if o.smoothquant is not None else []) + (weight_only if o.weight_algorithm == "awq" else [])
        if wanted:
            if ctx.calibration is None or ctx.source_model is None:
                raise CalibrationError("SmoothQuant and AWQ need calibration data: pass --calib DATA")
            factories: dict[str, Any] = {}
            for t in smooth_targets(graph, wanted):
                factories.setdefault(t.tensor, partial(ChannelStats, t.axis, o.smooth_rows, ctx.seed))
            stats = Calibrator(ir.export_model(graph, ctx.source_model), factories).run(
                ctx.calibration(), max_batches=o.calib_batches, progress=ctx.progress.enabled
            )

            def spec_for(node: ir.Node) -> NodeSpec | None:
                return config.for_node(node.name, node.op)

            if o.smoothquant is not None and smooth:
                done["smoothquant"] = smoothquant(graph, smooth, stats, o.smoothquant, spec_for)
            if o.weight_algorithm == "awq" and weight_only:
                done["awq"] = awq(graph, weight_only, stats, spec_for)
        for algorithm, entries in done.items():
            if entries:
                result.modified = True
                result.stats[algorithm] = len(entries)
        return done

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        if self.options.target == "ascend-qdq":
            check_float_inputs(graph)
        if self.target is not None or self.options.sensitivity:  # candidates are runs of this pass, Ascend ones too
            return tuned_quantize(self, graph, ctx)
        if self.options.target == "ascend":  # the Ascend emitters (onnxcomp/quant/ascend/) after scale migration
            result = PassResult(modified=False)
            options = AscendOptions.from_pass(self.options)
            ascend_quantize(
                graph,
                ctx,
                self.config,
                options,
                result,
                lambda: self._migrate_scales(graph, ctx, result),
                self.learn_weights,
                lambda model, wanted: self._collect(model, wanted, ctx),
            )
            return result
        result = PassResult(modified=False)
        # The graph as given, while it still is the input model: planning may rewrite nodes
        # (a constant left operand is moved right through Transposes), and then it no longer is.
        as_given = _structure(graph) if ctx.graph_is_source else None
        migrated = self._migrate_scales(graph, ctx, result)
        plans, declined = plan_nodes(graph, self.config, self.options.output_quant, self.options.placement)
        result.declined.extend(declined)
        tables = (
            [] if self.embeddings is None else quantize_embeddings(graph, self.embeddings, self.options.skip, result)
        )
        if not plans:
            tables += self._quantize_bodies(graph, ctx, result)
            if tables:
                ctx.set_record("quant", tables)
                result.data["record"] = tables
                result.modified = True
            else:
                result.notes.append("no node to quantize")
            return result
        static = static_tensors(plans)
        wanted = {
            "ranges": range_factories(static),
            "energies": energy_factories(plans),
            "means": output_mean_factories(graph, [p.node for p in plans])
            if self.options.bias_correction != "none"
            else {},
            "hessians": hessian_factories(plans, self.options.gram_rows, ctx.rng)
            if self.options.weight_algorithm == "gptq"
            else {},
        }
        sqnr_report = self.options.report_batches > 0 and ctx.calibration is not None
        reads_float = any(wanted.values()) or sqnr_report or self.options.bias_correction != "none"
        # The float model is a model-sized copy: exported only when something reads it, and not at
        # all while the graph still is the input model (its sessions then read the input file).
        unchanged = as_given is not None and not result.modified and _structure(graph) == as_given
        float_model = (
            (ctx.source_model if unchanged else ir.export_model(graph, ctx.source_model))
            if ctx.source_model is not None and (reads_float or type(self).learn_weights is not Quantize.learn_weights)
            else None
        )
        stats: dict[str, dict[str, Any]] = {purpose: {} for purpose in wanted}
        if any(wanted.values()):
            if ctx.calibration is None:
                raise CalibrationError(needs_data(static, wanted))
            assert float_model is not None  # PassManager.run sets ctx.source_model before any pass runs
            with file_backed(float_model, ctx.source_path if unchanged else None):
                stats = self._collect(float_model, wanted, ctx)
        ranges = ranges_from(static, stats["ranges"])
        energies = energies_from(plans, stats["energies"])
        outputs = {p.node.outputs[0].name: (p.node.name, p.node.op) for p in plans}  # before nodes are replaced
        hessians = hessians_from(stats["hessians"])
        learned, notes = self.learn_weights(graph, plans, ranges, float_model, ctx, energies)
        record = apply_plans(graph, plans, ranges, self.options, ctx, energies, hessians, learned)
        for entry in record:
            if entry["node"] in notes:
                entry["distill"] = notes[entry["node"]]
        if self.options.bias_correction != "none":
            assert float_model is not None and ctx.calibration is not None  # checked with the statistics
            correct_layer_biases(graph, float_model, plans, record, stats["means"], self.options, ctx, result)
        record += tables
        attach_migrated(record, migrated)
        result.modified = True
        result.stats = {**plan_counts(plans), **result.stats}
        record += self._quantize_bodies(graph, ctx, result)  # after the statistics: the float model has none
        result.changed = [p.node.name for p in plans] + result.changed
        result.data["record"] = record
        ctx.set_record("quant", record)
        sqnr_report = sqnr_report and float_model is not None
        kernels_report = self.options.kernel_report and self.options.emit == "qdq" and ctx.source_model is not None
        if not (sqnr_report or kernels_report):
            return result
        ir.finalize(graph)  # the reports run the rewritten graph: it must be sorted
        quantized = ir.export_model(graph, ctx.source_model)  # one export for both reports
        if sqnr_report:
            assert float_model is not None and ctx.calibration is not None
            report = quantization_report(
                float_model, quantized, outputs, ctx.calibration(), self.options.report_batches
            )
            result.data["report"] = report
            ctx.artifacts["quant_report"] = report
        del float_model  # the kernel report's session is the next big allocation
        if kernels_report:
            nodes = [(p.node.name, p.node.op, _emulated(p)) for p in plans]
            if runs_on_ort(quantized):
                kernels = kernel_report(quantized, nodes)
                result.data["kernels"] = kernels
                ctx.artifacts.setdefault("quant_report", {})["kernels"] = kernels
            else:
                result.notes.append("no kernel report: onnxruntime's CPU provider cannot run this storage")
        return result

    def learn_weights(
        self,
        graph: ir.Graph,
        plans: list[NodePlan],
        ranges: dict[str, tuple[float, float]],
        float_model: Any,
        ctx: PassContext,
        energies: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Weights learned before emission (node name -> QuantizedWeight) and their record notes.

        None here: round-to-nearest / GPTQ; the ``distill`` pass overrides it (passes/distill.py).
        """
        return {}, {}

    def _collect(self, model: Any, wanted: dict[str, dict[str, Any]], ctx: PassContext) -> dict[str, dict[str, Any]]:
        """``collect_many``, reusing what ``stats_cache`` holds (the candidates of one accuracy search)."""
        assert ctx.calibration is not None
        cache = self.stats_cache
        if cache is None:
            return collect_many(model, wanted, ctx.calibration(), self.options.calib_batches, ctx.progress.enabled)
        keys = {p: {t: (p, t, _factory_key(f)) for t, f in tensors.items()} for p, tensors in wanted.items()}
        missing = {p: {t: f for t, f in tensors.items() if keys[p][t] not in cache} for p, tensors in wanted.items()}
        if any(missing.values()):
            got = collect_many(model, missing, ctx.calibration(), self.options.calib_batches, ctx.progress.enabled)
            for p, tensors in got.items():
                for t, collector in tensors.items():
                    cache[keys[p][t]] = collector
        return {p: {t: cache[keys[p][t]] for t in tensors} for p, tensors in wanted.items()}

    def _quantize_bodies(self, graph: ir.Graph, ctx: PassContext, result: PassResult) -> list[dict[str, Any]]:
        """Quantize the nodes inside If/Loop/Scan bodies that need no calibration statistics.

        onnxruntime cannot expose a tensor of a body as a model output, so a body node whose
        activations or weight observer need calibration is declined with that reason.
        """
        record: list[dict[str, Any]] = []
        for body, where in list(ir.iter_graphs(graph))[1:]:
            plans, declined = plan_nodes(body, self.config, self.options.output_quant, self.options.placement)
            result.declined += [(name, f"{where}: {reason}") for name, reason in declined]
            runnable = []
            for plan in plans:
                why = needs_statistics(plan, self.options)
                if why is None:
                    runnable.append(plan)
                else:
                    result.declined.append(
                        (
                            plan.node.name,
                            f"{where}: calibration cannot tap subgraph tensors ({why}); "
                            "quantize it weight-only (--activations none) or skip it",
                        )
                    )
            if runnable:
                record += apply_plans(body, runnable, {}, self.options, ctx, {}, {})
                for key, count in plan_counts(runnable).items():
                    result.stats[key] = result.stats.get(key, 0) + count
                result.changed += [f"{p.node.name} ({where})" for p in runnable]
        return record


def _structure(graph: ir.Graph) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """Every node's op and input / output names, in order: equal before and after a step that
    rewired or added nothing (weights changed in place are the passes' ``result.modified``)."""
    return [(n.op, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs)) for n in graph.nodes]


def _factory_key(factory: Any) -> str:
    """What a collector factory collects, as a cache key (a factory bound to graph nodes is never reused)."""
    if isinstance(factory, partial) and all(isinstance(a, (str, int, float, bool)) for a in factory.args):
        return repr((factory.func.__qualname__, factory.args, sorted(factory.keywords.items())))
    return f"unshared:{id(factory)}"


def _emulated(plan: NodePlan) -> str | None:
    """The format of a node with no integer kernel on onnxruntime's CPU provider, or None."""
    return emulated_reason(plan.spec)
