"""sparsify_2to4: n:m structured sparsity (2:4 by default) along the input-channel axis of weights."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.calibration.collect import Calibrator
from onnxcomp.calibration.gram import Fanout, InputGram
from onnxcomp.errors import CalibrationError, ConfigError, RecipeError
from onnxcomp.formats.nm import NMPattern, apply_nm, nm_fraction, parse_pattern
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass
from onnxcomp.ir import match_glob, reduction_axis, weight_layout
from onnxcomp.sparsity import record
from onnxcomp.sparsity.coupling import float_weight
from onnxcomp.sparsity.dense_collect import collect_dense_target
from onnxcomp.sparsity.dense_target import DenseFit, DenseTargetStats, fit_dense_target
from onnxcomp.sparsity.sparsegpt import output_error, sparsegpt_nm

log = logging.getLogger(__name__)

WeightOp = Literal["Conv", "ConvTranspose", "Gemm", "MatMul"]


@register_pass
class Sparsify2to4(Pass):
    """Keep ``n`` of every ``m`` weights along the input-channel axis, by magnitude or by SparseGPT.

    ``method = "magnitude"`` keeps the ``n`` largest-magnitude weights of every ``m``.
    ``method = "sparsegpt"`` (the default when calibration data is given; without it, an explicit
    ``sparsegpt`` is an error) chooses the mask by the optimal-brain-surgeon error and updates the
    kept weights to compensate (:mod:`onnxcomp.sparsity.sparsegpt`), from each layer's input
    Hessian ``H = mean(X^T X)``: with ``mask_rule = "obs"`` (the default) each group of ``m`` keeps
    the ``n`` weights whose removal sweep costs least of every candidate, with ``"saliency"`` the
    ``n`` of largest ``w^2 / [H^-1]_jj^2`` (SparseGPT's rule; 2:4 on ppocr_cls: 0.935-0.957 of fp32
    top-1 over five calibration seeds, "obs" 0.954-0.973: bench/README.md, "2:4 SparseGPT across
    calibration seeds").
    With ``sequential`` (the default) the layers are sparsified in graph order and each layer's
    Hessian comes from a calibration pass over the model with every earlier layer already sparse
    (one pass per layer, so later layers compensate the error upstream; memory: one ``d x d``
    float64 matrix, ``d`` the layer's ``Cin/group*kh*kw`` or K); ``sequential = false`` takes all
    Hessians from ONE pass over the model as it enters the pass (faster, one matrix per layer held
    at once, less accurate). With ``sequential`` and ``target = "dense"`` (the default) each layer
    is fitted to the DENSE model's output of that layer on the same batch instead of to its own
    dense weights on its new input (:mod:`onnxcomp.sparsity.dense_target`: least-squares target,
    SparseGPT mask and update on it, exact refit of the kept weights, the per-channel bias
    corrected; one pass over the sparse model truncated at the layer's input and the dense model
    per layer, memory: one ``(d+1) x (d+1+Cout)`` float64 block per layer at a time), so the error
    of every earlier layer is compensated, not carried forward; ``target = "layer"`` is the plain
    sequential SparseGPT. At most ``rows_per_batch`` design rows are sampled per batch and
    layer, over ``calib_batches`` batches (None: all). Layers
    SparseGPT cannot handle (ConvTranspose, a batched MatMul weight) use magnitude. Opt-in,
    ``dense_layers = N`` leaves the N layers whose one-shot SparseGPT relative output error is
    largest dense (one extra calibration pass; listed as declined and in
    ``data["dense_layers"]``). The method
    of every layer is in its record entry and in ``data["method"]``.

    The axis is Cin for Conv (at every ``(cout, kh, kw)``; Cin for ConvTranspose too) and K for
    Gemm (``transB`` aware) and MatMul with a constant weight. An axis whose length is not a
    multiple of ``m`` is zero-padded for the selection; an axis of length ``<= n`` or ``< m`` is left alone.
    The weight keeps its shape, so nothing around it changes. Shared weights get their own copy.
    Every sparsified weight satisfies the pattern on 100 % of its groups (``stats``).

    Declines a layer whose weight is not a float constant (MatMul: not the second input), whose
    input-channel axis has length ``<= n`` or ``< m`` (no whole group: a first conv on the 3 image
    channels, where no n:m kernel gains anything), that matches ``skip``, or that ``prune_channels``
    pruned earlier in the same run (one kind of sparsity per layer). Already n:m-sparse weights
    are counted as ``already`` and left as they are.
    """

    name = "sparsify_2to4"
    keeps_outputs_close = False  # zeroes half the weights at a chosen pattern: validation checks shapes, not values

    @dataclass(frozen=True)
    class Options:
        pattern: str = "2:4"  # n:m (keep n of every m)
        ops: tuple[WeightOp, ...] = ("Conv", "Gemm", "MatMul")
        skip: tuple[str, ...] = ()  # node-name globs left dense
        method: Literal["magnitude", "sparsegpt"] | None = None  # None: sparsegpt with calibration data
        damp: float = 0.01  # SparseGPT: diagonal damping of H, relative to mean(diag H)
        block: int = 128  # SparseGPT: lazy-update block width (columns)
        rows_per_batch: int = 4096  # SparseGPT: design rows sampled per calibration batch and layer
        calib_batches: int | None = None  # SparseGPT: calibration batches used (None: all)
        sequential: bool = True  # SparseGPT: each layer's Hessian from the model with the layers before it sparse
        target: Literal["dense", "layer"] = "dense"  # sequential: fit the dense model's output, or the layer's own
        ridge: float = 0.1  # dense target: ridge towards the dense weights, relative to mean(diag H)
        refit_kept: bool = False  # dense target: least-squares refit of the kept weights (overfits small data)
        dense_layers: int = 0  # SparseGPT, opt-in: leave the N layers of largest one-shot output error dense
        mask_rule: Literal["obs", "saliency"] = (
            "obs"  # SparseGPT: each group's mask by its exact sweep cost, or w^2/U_jj^2
        )

        def __post_init__(self) -> None:
            if self.damp < 0 or self.ridge < 0 or self.block < 1 or self.rows_per_batch < 1 or self.dense_layers < 0:
                raise ValueError("damp, ridge and dense_layers must be >= 0, block and rows_per_batch >= 1")

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        try:
            self.pattern: NMPattern = parse_pattern(self.options.pattern)
        except ConfigError as exc:
            raise RecipeError(f"sparsify_2to4.pattern: {exc}") from exc

    def method(self, ctx: PassContext) -> str:
        """The method this run uses (the option, or sparsegpt exactly when there is calibration data)."""
        method = self.options.method or ("sparsegpt" if ctx.calibration is not None else "magnitude")
        if method == "sparsegpt" and ctx.calibration is None:
            raise CalibrationError(
                "sparsify_2to4 method 'sparsegpt' needs calibration data: pass --calib DATA "
                "(an .npz named by model input), or use --method magnitude"
            )
        return method

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        """The graph, then every If/Loop/Scan body by magnitude: onnxruntime cannot expose a
        body's tensors, so no calibration statistic (SparseGPT's Hessians) exists there."""
        result = self._run_graph(graph, ctx)
        bodies = list(ir.iter_graphs(graph))[1:]
        if not bodies:
            return result
        plain = Sparsify2to4(dataclasses.replace(self.options, method="magnitude", dense_layers=0))
        inner_ctx = PassContext(seed=ctx.seed, artifacts=ctx.artifacts, source_model=ctx.source_model)
        for body, where in bodies:
            inner = plain._run_graph(body, inner_ctx)  # noqa: SLF001 - the same pass on one body
            result.modified |= inner.modified
            for key, value in inner.stats.items():
                result.stats[key] = result.stats.get(key, 0) + value
            result.changed += [f"{item} ({where})" for item in inner.changed]
            result.declined += [(name, f"{where}: {reason}") for name, reason in inner.declined]
            result.data.setdefault("layers", []).extend(inner.data.get("layers", []))
            if inner.changed and self.method(ctx) == "sparsegpt":
                result.notes.append(f"{where}: magnitude (calibration cannot tap subgraph tensors)")
        return result

    def _run_graph(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"layers": 0, "already": 0, "zeroed": 0, "groups": 0, "groups_ok": 0})
        pruned = record.layers_of_kind(ctx, "channels")
        method = self.method(ctx)
        entries = []
        candidates = []
        for node in ir.iter_nodes(graph, self.options.ops):
            reason, weight, axis = self._check(node, pruned)
            if reason:
                result.declined.append((node.name, reason))
                log.debug("sparsify_2to4: %s declined: %s", node.name, reason)
                continue
            assert weight is not None
            candidates.append((node, weight, axis))
        if method == "sparsegpt" and self.options.dense_layers:
            candidates = self._leave_sensitive_dense(graph, ctx, candidates, result)
        sequential = method == "sparsegpt" and self.options.sequential
        dense = sequential and self.options.target == "dense"
        hessians = self._hessians(graph, ctx, candidates) if method == "sparsegpt" and not sequential else {}
        targets = self._dense_model(graph, ctx, candidates) if dense else None
        methods: dict[str, str] = {}
        candidates.reverse()
        while candidates:  # popped in graph order: a weight read from a map is dropped once written
            node, weight, axis = candidates.pop()
            magnitude = apply_nm(weight, axis, self.pattern)
            fit = None
            if targets is not None and self._handled(node, weight, axis):
                fit = self._fit_dense(graph, ctx, node, weight, axis, targets)
            elif sequential:  # this layer's input as the layers before it are now
                hessians = self._hessians(graph, ctx, [(node, weight, axis)])
            hessian = hessians.get(id(node))
            sparse, used, errors = magnitude, "magnitude", {}
            if fit is not None:
                sparse, used = fit.weight, fit.method
                errors = {
                    "output_error": round(fit.errors["fit"], 6),
                    "output_error_magnitude": round(fit.errors["magnitude"], 6),
                    "output_error_dense": round(fit.errors["dense"], 6),
                    "target": "dense",
                }
                if fit.bias is not None:
                    _set_bias(graph, node, fit.bias, weight.dtype)
            elif hessian is not None and not np.array_equal(magnitude, weight):
                layout = weight_layout(node.op, weight.ndim, bool(node.attrs.get("transB", 0)))
                axes = {"channel_axis": layout.channel_axis, "reduction_axis": layout.reduction_axis}
                o = self.options
                sparse = sparsegpt_nm(
                    weight, self.pattern, hessian, damp=o.damp, block=o.block, mask_rule=o.mask_rule, **axes
                )
                used = "sparsegpt"
                errors = {
                    "output_error": round(output_error(weight, sparse, hessian, **axes), 6),
                    "output_error_magnitude": round(output_error(weight, magnitude, hessian, **axes), 6),
                }
            groups = int(np.prod(weight.shape)) // weight.shape[axis] * -(-weight.shape[axis] // self.pattern.m)
            ok = nm_fraction(sparse, axis, self.pattern)
            result.stats["groups"] += groups
            result.stats["groups_ok"] += int(round(ok * groups))
            if np.array_equal(sparse, weight):
                result.stats["already"] += 1
                continue
            ir.write_input(graph, node, 1, sparse)
            zeroed = int(np.count_nonzero(weight) - np.count_nonzero(sparse))
            result.stats["layers"] += 1
            result.stats["zeroed"] += zeroed
            methods[node.name] = used
            result.changed.append(f"{node.name}: {self.pattern} along axis {axis} ({used})")
            zeros = round(float(np.mean(sparse == 0)), 6)
            entries.append(
                {
                    "node": node.name,
                    "op": node.op,
                    "kind": "n:m",
                    "pattern": str(self.pattern),
                    "tensor": node.inputs[1].name,
                    "axis": axis,
                    "zero_fraction": zeros,
                    "pattern_fraction": ok,
                    "method": used,
                    **errors,
                }
            )
            result.modified = True
        result.data["layers"] = entries
        result.data["method"] = methods
        record.add_layers(ctx, entries)
        return result

    def _leave_sensitive_dense(
        self, graph: ir.Graph, ctx: PassContext, candidates: list[tuple[ir.Node, np.ndarray, int]], result: PassResult
    ) -> list[tuple[ir.Node, np.ndarray, int]]:
        """Decline the ``dense_layers`` candidates whose one-shot SparseGPT output error is largest."""
        hessians = self._hessians(graph, ctx, candidates)
        scores: dict[int, float] = {}
        for node, weight, _axis in candidates:
            hessian = hessians.get(id(node))
            if hessian is None:
                continue
            layout = weight_layout(node.op, weight.ndim, bool(node.attrs.get("transB", 0)))
            axes = {"channel_axis": layout.channel_axis, "reduction_axis": layout.reduction_axis}
            o = self.options
            sparse = sparsegpt_nm(
                weight, self.pattern, hessian, damp=o.damp, block=o.block, mask_rule=o.mask_rule, **axes
            )
            scores[id(node)] = output_error(weight, sparse, hessian, **axes)
        ranked = sorted(scores, key=lambda key: -scores[key])[: self.options.dense_layers]
        left = []
        for node, weight, axis in candidates:
            if id(node) in ranked:
                reason = (
                    f"one of the {self.options.dense_layers} layers of largest one-shot SparseGPT output "
                    f"error ({scores[id(node)]:.4f}): left dense (dense_layers)"
                )
                result.declined.append((node.name, reason))
                result.data.setdefault("dense_layers", []).append(node.name)
            else:
                left.append((node, weight, axis))
        return left

    def _handled(self, node: ir.Node, weight: np.ndarray, axis: int) -> bool:
        """Whether SparseGPT handles this layer (else magnitude) and it is not already n:m."""
        if node.op == "ConvTranspose" or (node.op == "MatMul" and weight.ndim != 2) or ir.is_constant(node.inputs[0]):
            return False
        return not np.array_equal(apply_nm(weight, axis, self.pattern), weight)

    def _dense_model(
        self, graph: ir.Graph, ctx: PassContext, candidates: list[tuple[ir.Node, np.ndarray, int]]
    ) -> onnx.ModelProto | None:
        """The model as it enters the pass (the dense targets), when some layer is handled."""
        if not any(self._handled(node, weight, axis) for node, weight, axis in candidates):
            return None
        return ir.export_model(graph, ctx.source_model if ctx.source_model is not None else onnx.ModelProto())

    def _fit_dense(
        self, graph: ir.Graph, ctx: PassContext, node: ir.Node, weight: np.ndarray, axis: int, dense: onnx.ModelProto
    ) -> DenseFit | None:
        """One pass: the layer's input in the model as it is now and its output in the dense model; the fit."""
        bias, fit_bias = _effective_bias(node, weight)
        if fit_bias is None:
            return None  # a bias that is not constant per output channel: plain SparseGPT
        x_name, y_name = node.inputs[0].name, node.outputs[0].name
        model = ir.export_model(graph, ctx.source_model if ctx.source_model is not None else onnx.ModelProto())
        stats = DenseTargetStats(node, self.options.rows_per_batch, ctx.rng(f"{node.name}:2to4"))
        assert ctx.calibration is not None
        # one model computing both tensors: sharded over --workers / --ray like any calibration
        collect_dense_target(
            model, dense, x_name, y_name, stats, ctx.calibration(), self.options.calib_batches, ctx.progress.enabled
        )
        del model
        layout = weight_layout(node.op, weight.ndim, bool(node.attrs.get("transB", 0)))
        scale = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        o = self.options
        fit = fit_dense_target(
            weight.astype(np.float64) * scale,
            bias,
            stats,
            self.pattern,
            channel_axis=layout.channel_axis,
            reduction_axis=layout.reduction_axis,
            fit_bias=fit_bias,
            damp=o.damp,
            ridge=o.ridge,
            block=o.block,
            refit_kept=o.refit_kept,
            mask_rule=o.mask_rule,
        )
        if fit.method == "magnitude":
            fit.weight = apply_nm(weight, axis, self.pattern)
        else:
            fit.weight = (fit.weight / scale).astype(weight.dtype)
        return fit

    def _hessians(
        self, graph: ir.Graph, ctx: PassContext, candidates: list[tuple[ir.Node, np.ndarray, int]]
    ) -> dict[int, np.ndarray]:
        """One calibration pass: the input Hessian of every layer SparseGPT handles, by ``id(node)``."""
        grams: dict[int, InputGram] = {}
        for node, weight, axis in candidates:
            if not self._handled(node, weight, axis):
                continue
            rng = ctx.rng(f"sparsify_2to4:{node.name}")
            grams[id(node)] = InputGram(node, max_rows=self.options.rows_per_batch, rng=rng)
        if not grams:
            return {}
        by_tensor: dict[str, list[InputGram]] = {}
        for gram in grams.values():
            by_tensor.setdefault(gram.node.inputs[0].name, []).append(gram)
        factories = {name: (lambda group=group: Fanout(group)) for name, group in by_tensor.items()}
        model = ir.export_model(graph, ctx.source_model if ctx.source_model is not None else onnx.ModelProto())
        assert ctx.calibration is not None
        calibrator = Calibrator(model, factories)
        del model
        calibrator.run(ctx.calibration(), max_batches=self.options.calib_batches, progress=ctx.progress.enabled)
        return {key: gram.blocks() if gram.groups > 1 else gram.hessian() for key, gram in grams.items()}

    def _check(self, node: ir.Node, pruned: set[str]) -> tuple[str | None, np.ndarray | None, int]:
        glob = match_glob(node.name, self.options.skip)
        if glob:
            return f"skipped (matches {glob!r})", None, 0
        if node.name in pruned:
            return "channel-pruned earlier in this run (one kind of sparsity per layer)", None, 0
        weight = float_weight(node)
        if weight is None:
            return "its weight (input 1) is not a float constant", None, 0
        if weight.ndim < 2:
            return f"its weight is {weight.ndim}-D", None, 0
        axis = reduction_axis(node.op, weight.ndim, bool(node.attrs.get("transB", 0)))
        if weight.shape[axis] <= self.pattern.n:
            depthwise = " (a depthwise conv: one input channel per filter)" if weight.shape[axis] == 1 else ""
            return (
                f"its input-channel axis has length {weight.shape[axis]} <= {self.pattern.n}{depthwise}: "
                f"no weight to choose between in a group of {self.pattern}, left dense",
                None,
                0,
            )
        if weight.shape[axis] < self.pattern.m:  # e.g. a first conv on 3 image channels
            return (
                (
                    f"its input-channel axis has length {weight.shape[axis]} < {self.pattern.m}: "
                    f"not one whole group of {self.pattern}, left dense"
                ),
                None,
                0,
            )
        return None, weight, axis


def _effective_bias(node: ir.Node, weight: np.ndarray) -> tuple[np.ndarray | None, bool | None]:
    """``(bias added to X W, whether a new one may be written)``; ``(None, None)``: unknown bias.

    Conv: its B (or none, then one is added). Gemm: ``beta * C`` when C is a constant scalar or per
    output column (a new C is written per column with ``beta = 1``). MatMul: none, and none added.
    """
    if node.op == "MatMul":
        return None, False
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return None, True
    value = ir.folded_value(node.inputs[2])
    if value is None:
        return None, None
    cout = weight.shape[0] if node.op == "Conv" or node.attrs.get("transB", 0) else weight.shape[1]
    if node.op == "Conv":
        return (value.astype(np.float64), True) if value.shape == (cout,) else (None, None)
    if value.size not in (1, cout) or (value.ndim == 2 and value.shape[0] != 1) or value.ndim > 2:
        return None, None
    beta = float(node.attrs.get("beta", 1.0))
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (cout,)) * beta, True


def _set_bias(graph: ir.Graph, node: ir.Node, bias: np.ndarray, dtype: np.dtype) -> None:
    """Write ``bias`` (per output channel) as the node's bias: Conv B, Gemm C (with ``beta = 1``)."""
    bias = np.asarray(bias).astype(dtype)
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    if len(node.inputs) > 2 and node.inputs[2].name:
        ir.write_input(graph, node, 2, bias)
        return
    const = ir.make_constant(ir.unique_name(graph, f"{node.name or node.op}_bias"), bias)
    if len(node.inputs) > 2:
        node.inputs[2] = const
    else:
        node.inputs.append(const)
