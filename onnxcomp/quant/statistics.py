"""The calibration statistics a quantization run collects, and the quantities they give.

Which tensors need calibrated ranges (:func:`static_tensors`) and what a plan cannot do without
calibration data (:func:`needs_statistics`, :func:`needs_data`); observer factories per tensor
(static activation ranges, GPTQ's input Grams, the input energies of the ``output_mse`` weight
observer) for one streaming calibration pass, and the ranges, Hessians and energies read from
the filled observers. Shared by the ``quantize`` pass and the Ascend pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np

from onnxcomp import ir
from onnxcomp.calibration.gram import Fanout, InputGram
from onnxcomp.calibration.observers import compute_range, make_observer
from onnxcomp.quant.plan import NodePlan
from onnxcomp.quant.qparams import range_qdq
from onnxcomp.quant.spec import TensorSpec
from onnxcomp.quant.weights import InputEnergyObserver

#: Observer options that configure the statistics (the rest configure the range policy).
_STAT_OPTIONS = ("num_bins",)


def hessian_factories(
    plans: list[NodePlan], max_rows: int, rng: Callable[[str], np.random.Generator]
) -> dict[str, Callable[[], Fanout]]:
    """GPTQ's input Gram collectors, one per weighted Conv/Gemm/MatMul, grouped by the tensor they read."""
    readers: dict[str, list[ir.Node]] = {}
    for p in plans:
        if p.spec.weights is not None and p.weight_index == 1 and p.node.op in ("Conv", "Gemm", "MatMul"):
            readers.setdefault(p.node.inputs[0].name, []).append(p.node)
    return {
        tensor: partial(_grams, nodes, max_rows, [rng(f"gptq:{n.name}") for n in nodes])
        for tensor, nodes in readers.items()
    }


def _grams(nodes: list[ir.Node], max_rows: int, rngs: list[np.random.Generator]) -> Fanout:
    return Fanout([InputGram(n, max_rows=max_rows, rng=r) for n, r in zip(nodes, rngs, strict=True)])


def hessians_from(observers: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """node name -> mean ``X^T X`` (``(d, d)``, or ``(group, d, d)`` for a grouped Conv)."""
    found = {}
    for fanout in observers.values():
        for gram in fanout.accumulators:
            blocks = gram.blocks()
            found[gram.node.name] = blocks[0] if len(blocks) == 1 else blocks
    return found


def range_factories(static: dict[str, TensorSpec]) -> dict[str, Callable[[], Any]]:
    """Observer factories of the static activation tensors (name -> factory)."""
    factories: dict[str, Callable[[], Any]] = {}
    for name, spec in static.items():
        stat_opts = {k: v for k, v in spec.options().items() if k in _STAT_OPTIONS}
        factories[name] = partial(make_observer, spec.observer, **stat_opts)
    return factories


def ranges_from(static: dict[str, TensorSpec], observers: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """A range per activation tensor from its filled observer, by the tensor's policy."""
    ranges = {}
    for name, spec in static.items():
        policy_opts = {k: v for k, v in spec.options().items() if k not in _STAT_OPTIONS}
        r = compute_range(
            spec.observer, observers[name], range_qdq(spec.dtype, spec.symmetric), spec.symmetric, **policy_opts
        )
        ranges[name] = (float(r.lo), float(r.hi))
    return ranges


def energy_factories(plans: list[NodePlan]) -> dict[str, Callable[[], InputEnergyObserver]]:
    """Input-energy collectors of the nodes whose weight observer is output_mse (tensor -> factory)."""
    factories: dict[str, Callable[[], InputEnergyObserver]] = {}
    for p in plans:
        if p.spec.weights is not None and p.spec.weights.observer == "output_mse":
            axis = 1 if p.node.op in ("Conv", "ConvTranspose", "Gemm") else -1
            factories.setdefault(p.node.inputs[0].name, partial(InputEnergyObserver, axis))
    return factories


def energies_from(plans: list[NodePlan], observers: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Mean x^2 per input channel of each output_mse node (node name -> array)."""
    return {
        p.node.name: observers[p.node.inputs[0].name].energy()
        for p in plans
        if p.spec.weights is not None and p.spec.weights.observer == "output_mse"
    }


def static_tensors(plans: list[NodePlan]) -> dict[str, TensorSpec]:
    """Activation tensors needing calibrated ranges (name -> spec), in plan order."""
    tensors: dict[str, TensorSpec] = {}
    for plan in plans:
        spec = plan.spec.activations
        if spec is None or spec.granularity.kind != "tensor":
            continue
        for t in plan.activation_inputs + plan.activation_outputs:
            tensors.setdefault(t.name, spec)
    return tensors


def needs_statistics(plan: NodePlan, options: Any) -> str | None:
    """What calibration statistic quantizing ``plan`` needs, or None when it needs none."""
    if static_tensors([plan]):
        assert plan.spec.activations is not None
        return f"static {plan.spec.activations.dtype} activations"
    if plan.spec.weights is not None and plan.spec.weights.observer == "output_mse":
        return "weight observer output_mse"
    if options.weight_algorithm == "gptq":
        return "GPTQ"
    if options.bias_correction != "none":
        return "bias correction"
    return None


def needs_data(static: dict[str, TensorSpec], wanted: dict[str, dict[str, Any]]) -> str:
    """The error message of a run that wants statistics (``wanted``) without calibration data."""
    if static:
        return (
            f"static {static[next(iter(static))].dtype} activations need calibration data: pass --calib DATA "
            "(an .npz named by model input), or --activations none for weight-only quantization"
        )
    if wanted["energies"]:
        return "weight observer output_mse needs calibration data: pass --calib DATA"
    if wanted["hessians"]:
        return "GPTQ needs calibration data (the layers' input statistics): pass --calib DATA"
    return "bias correction needs calibration data: pass --calib DATA"


def plan_counts(plans: list[NodePlan]) -> dict[str, int]:
    """Quantized nodes per op type, and ``nodes``: their total (the pass's stats)."""
    stats: dict[str, int] = {}
    for plan in plans:
        key = plan.node.op
        stats[key] = stats.get(key, 0) + 1
    stats["nodes"] = len(plans)
    return stats
