"""prune_channels: remove whole output channels of layers and the matching inputs of their consumers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.blas import single_threaded_blas
from onnxcomp.errors import CalibrationError
from onnxcomp.formats.nm import is_nm_sparse
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass
from onnxcomp.ir import describe, match_glob, reduction_axis
from onnxcomp.sparsity import reconstruct, record, rewrite, select
from onnxcomp.sparsity.coupling import ChannelGroup, CouplingAnalysis, float_weight
from onnxcomp.sparsity.gram import GramAccumulator, SinkMatrix, sink_matrix
from onnxcomp.sparsity.masks import keep_count

log = logging.getLogger(__name__)

PrunableOp = Literal["Conv", "Gemm", "MatMul"]
Plan = tuple[ChannelGroup, float]  # a prunable group and the ratio it is pruned by


@register_pass
class PruneChannels(Pass):
    """Remove output channels of Conv/Gemm/MatMul layers and the matching inputs of their consumers.

    Layers whose channels must change together form a group (``onnxcomp.sparsity.coupling``):
    Conv -> (BatchNormalization) -> activations -> Conv/Gemm consumers, through shape-preserving
    elementwise ops, pools, depthwise convs and Flatten/flattening Reshape -> Gemm (each removed
    channel removes its flattened positions); residual ``Add`` and SE ``Mul`` couple the layers
    they join, which are pruned in lock-step. Each group keeps ``keep_count(C, ratio, round_to)``
    channels chosen by ``criterion`` (weight norms ``l1``/``l2``, or ``data``: the smallest
    increase of the consumers' output error on calibration data); with ``refit`` every
    consumer is then refit by least squares on calibration activations so its output matches the
    unpruned model (``onnxcomp.sparsity.reconstruct``). ``ratio`` applies per group (``scope =
    "layer"``, with ``ratios`` overriding it by node-name glob) or to the whole model (``scope =
    "global"``, at most ``max_ratio`` of any group). BatchNorm should be folded first (``fuse``).

    Declines a group (reported under each of its layers) when its channels reach a graph input
    or output, a Concat along the channel axis, a grouped conv or a depthwise conv with a channel
    multiplier, a Reshape it cannot follow, ConvTranspose or any op it does not know; when a layer
    matches ``skip`` or a coupled layer is not among ``ops``; when a weight is not a float
    constant; when a layer of the group is n:m sparse (one kind of sparsity per layer); or when
    rounding keeps every channel.
    """

    name = "prune_channels"
    keeps_outputs_close = False  # removes capacity at a chosen ratio: validation checks shapes, not values

    @dataclass(frozen=True)
    class Options:
        RENAMED: ClassVar[dict[str, str]] = {"reconstruct": "refit", "batch_num": "calib_batches"}
        ratio: float = 0.3  # fraction of channels removed (per group, or overall with scope="global")
        scope: Literal["layer", "global"] = "layer"
        ratios: dict[str, float] = field(default_factory=dict)  # node-name glob -> ratio (overrides)
        skip: tuple[str, ...] = ()  # node-name globs of layers whose channels are left alone
        ops: tuple[PrunableOp, ...] = ("Conv", "Gemm", "MatMul")
        round_to: int = 1  # kept channels rounded up to a multiple of this (hardware alignment)
        criterion: Literal["l1", "l2", "data"] = "l2"
        refit: bool = True  # least-squares refit of the consumers (needs calibration data)
        max_ratio: float = 0.9  # global scope: the most any group may lose
        damping: float = 1e-2  # ridge of the refit towards the plain-removal weights, relative to the mean input energy
        rows_per_batch: int = 1024  # rows (Conv output positions) sampled per calibration batch and consumer
        calib_batches: int | None = None  # calibration batches used (None: all)

        def __post_init__(self) -> None:
            for name, value in [("ratio", self.ratio), ("max_ratio", self.max_ratio), *self.ratios.items()]:
                if not 0.0 <= float(value) < 1.0:
                    raise ValueError(f"ratio {name!r} must be in [0, 1), got {value!r}")
            if self.round_to < 1 or self.rows_per_batch < 1 or self.damping < 0:
                raise ValueError("round_to and rows_per_batch must be >= 1 and damping >= 0")

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        with single_threaded_blas():  # small matrices: OpenBLAS threads only spin on a loaded machine
            result = self._run(graph, ctx)
        for node, where in ir.body_nodes(graph, self.options.ops):
            result.declined.append((node.name, f"{where}: channels are pruned in the main graph only"))
        return result

    def _run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        result = PassResult(
            modified=False, stats=dict.fromkeys(("groups", "layers", "channels_before", "channels_after", "refit"), 0)
        )
        plans = self._plans(graph, ctx, result)
        matrices: dict[int, SinkMatrix] = {}
        for group, _ in plans:
            for sink in group.sinks:
                sm = sink_matrix(sink)
                if isinstance(sm, SinkMatrix):
                    matrices[id(sink.node)] = sm
                else:
                    result.notes.append(f"{sink.node.name}: not refit: {sm}")
        original = self._original(graph, ctx) if plans and (o.refit or o.criterion == "data") else None
        accs: dict[int, GramAccumulator] = {}
        if original is not None and o.criterion == "data":
            accs = reconstruct.collect(original, list(matrices.values()), ctx, o.rows_per_batch, o.calib_batches)
        if o.scope == "global":
            plans = self._global(plans, accs)
        chosen: list[tuple[ChannelGroup, np.ndarray]] = []
        for group, ratio in plans:
            keep = self._keep(group, ratio, accs)
            if len(keep) < group.channels:
                chosen.append((group, keep))
            else:
                reason = f"ratio {ratio:g} with round_to {o.round_to} keeps all {group.channels} channels"
                self._decline(result, group, reason)
        for group, keep in chosen:
            rewrite.prune_inputs(graph, group, keep)
        for group, keep in chosen:
            rewrite.prune_outputs(graph, group, keep)
        fits = self._reconstruct(graph, ctx, original, chosen, matrices) if chosen and o.refit else {}
        result.data["layers"] = [e for g, k in chosen for e in self._entries(result, g, k, fits)]
        record.add_layers(ctx, result.data["layers"])
        result.modified = bool(chosen)
        return result

    def _plans(self, graph: ir.Graph, ctx: PassContext, result: PassResult) -> list[Plan]:
        """The prunable groups with their ratios; the others are declined with the reason."""
        plans = []
        sparse = record.layers_of_kind(ctx, "n:m")
        for group in CouplingAnalysis(graph, tuple(self.options.ops)).groups():
            reason = group.blocked or self._policy_reason(group, sparse)
            if reason:
                self._decline(result, group, reason)
            else:
                plans.append((group, self._ratio(group)))
        return plans

    def _original(self, graph: ir.Graph, ctx: PassContext) -> onnx.ModelProto:
        """The model before pruning (calibration statistics come from it)."""
        if ctx.calibration is None:
            need = "the refit" if self.options.refit else "criterion 'data'"
            raise CalibrationError(
                f"prune_channels {need} needs calibration data: pass --calib DATA (an .npz named by model input), "
                "or use --no-refit with a weight-norm criterion (l1, l2)"
            )
        return ir.export_model(graph, ctx.source_model if ctx.source_model is not None else onnx.ModelProto())

    def _reconstruct(
        self,
        graph: ir.Graph,
        ctx: PassContext,
        original: onnx.ModelProto | None,
        chosen: list[tuple[ChannelGroup, np.ndarray]],
        matrices: dict[int, SinkMatrix],
    ) -> dict[int, reconstruct.RefitResult | None]:
        assert original is not None
        out_keep = {id(s.node): (keep, s.axis) for group, keep in chosen for s in group.sources}
        jobs = [
            reconstruct.SinkJob(matrices[id(sink.node)], keep, out_keep.get(id(sink.node)))
            for group, keep in chosen
            for sink in group.sinks
            if id(sink.node) in matrices
        ]
        o = self.options
        return reconstruct.reconstruct_sinks(graph, original, jobs, ctx, o.damping, o.rows_per_batch, o.calib_batches)

    # --- policy ------------------------------------------------------------------------------

    def _policy_reason(self, group: ChannelGroup, sparse: set[str]) -> str | None:
        for source in group.sources:
            glob = match_glob(source.node.name, self.options.skip)
            if glob:
                coupled = "" if len(group.sources) == 1 else f"coupled with {describe(source.node)}, "
                return f"{coupled}skipped ({source.node.name!r} matches {glob!r})"
        for node, axis in [
            (s.node, reduction_axis(s.node.op, s.weight.ndim, bool(s.node.attrs.get("transB", 0))))
            for s in group.sources
        ] + [(s.node, -1) for s in group.sinks]:
            weight = float_weight(node)
            if axis == -1 and weight is not None:
                axis = reduction_axis(node.op, weight.ndim, bool(node.attrs.get("transB", 0)))
            if node.name in sparse or (weight is not None and weight.ndim > 1 and is_nm_sparse(weight, axis)):
                return f"{describe(node)} is n:m sparse (one kind of sparsity per layer)"
        if group.channels < 2:
            return "the layer has a single output channel"
        return None

    def _ratio(self, group: ChannelGroup) -> float:
        for pattern, ratio in self.options.ratios.items():
            if any(match_glob(s.node.name, [pattern]) for s in group.sources):
                return float(ratio)
        return self.options.ratio

    @staticmethod
    def _decline(result: PassResult, group: ChannelGroup, reason: str) -> None:
        names = group.names
        done = {name for name, _ in result.declined}
        for name in names:
            if name not in done:  # a group blocked early may be met again from a coupled layer
                result.declined.append((name, reason))
        log.debug("prune_channels: %s declined: %s", ", ".join(names), reason)

    # --- statistics and choice -----------------------------------------------------------------

    def _data_gram(self, group: ChannelGroup, accs: dict[int, GramAccumulator]) -> np.ndarray | None:
        grams = [reconstruct.removal_gram(accs[id(s.node)], group.channels) for s in group.sinks if id(s.node) in accs]
        return sum(grams[1:], grams[0]) if grams else None

    def _keep(self, group: ChannelGroup, ratio: float, accs: dict[int, GramAccumulator]) -> np.ndarray:
        count = group.channels - keep_count(group.channels, ratio, self.options.round_to)
        gram = self._data_gram(group, accs) if self.options.criterion == "data" else None
        if gram is not None:
            removed = reconstruct.greedy_removal(gram, count)
        else:
            crit = self.options.criterion if self.options.criterion != "data" else "l2"
            removed = select.lowest(select.norm_scores(group, crit), count)
        return select.keep_from_removed(group.channels, removed)

    def _global(self, plans: list[Plan], accs: dict[int, GramAccumulator]) -> list[Plan]:
        o = self.options
        free = [i for i, (g, _) in enumerate(plans) if not any(match_glob(s.node.name, o.ratios) for s in g.sources)]
        scores = []
        for i in free:
            gram = self._data_gram(plans[i][0], accs) if o.criterion == "data" else None
            crit = o.criterion if o.criterion != "data" else "l2"
            scores.append(np.diag(gram) if gram is not None else select.relative_norms(plans[i][0], crit))
        ratios = select.global_ratios(scores, o.ratio, o.max_ratio, o.round_to)
        out = list(plans)
        for i, ratio in zip(free, ratios, strict=True):
            out[i] = (plans[i][0], ratio)
        return out

    def _entries(
        self, result: PassResult, group: ChannelGroup, keep: np.ndarray, fits: dict[int, reconstruct.RefitResult | None]
    ) -> list[dict[str, Any]]:
        stats = result.stats
        stats["groups"] += 1
        sinks: list[dict[str, Any]] = []
        for sink in group.sinks:
            entry: dict[str, Any] = {"node": sink.node.name, "op": sink.node.op}
            fit = fits.get(id(sink.node))
            if fit is not None:
                stats["refit"] += 1
                entry.update(error_pruned=round(fit.error_pruned, 6), error_refit=round(fit.error_refit, 6))
            sinks.append(entry)
        names = group.names
        entries = []
        for source in group.sources:
            stats["layers"] += 1
            stats["channels_before"] += group.channels
            stats["channels_after"] += len(keep)
            result.changed.append(f"{source.node.name}: {group.channels} -> {len(keep)} channels")
            entries.append(
                {
                    "node": source.node.name,
                    "op": source.node.op,
                    "kind": "channels",
                    "channels_before": group.channels,
                    "channels_after": len(keep),
                    "coupled": [n for n in names if n != source.node.name],
                    "sinks": sinks,
                }
            )
        return entries
