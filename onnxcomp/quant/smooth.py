"""Per-input-channel scale migration before quantization: SmoothQuant and AWQ.

Both rewrite ``y = x W`` as ``y = (x / s) (s W)``; :func:`onnxcomp.quant.migration.smooth_targets`
groups the candidates by input tensor (one shared ``s`` per group) and finds where ``1/s`` goes
(:mod:`onnxcomp.quant.migration`); the float outputs do not change (within rounding).

:func:`smoothquant` (Xiao et al., 2023): ``s_j = max|X_j|^a / max|W_j|^(1-a)`` with ``max|W_j|``
over every output channel of every node of the group; ``alpha="auto"`` picks ``a`` per group on
a grid by the simulated quantized output error on calibration rows. :func:`awq` (Lin et al., 2024):
``s = mean|X_j|^a`` normalised, ``a`` searched on 20 points by the weight-only output error. AWQ's
clipping search is the weight observer ``output_mse`` (:func:`onnxcomp.quant.weights.quantize_weight`),
which the simulation here honours. Statistics come from :class:`onnxcomp.calibration.channels.ChannelStats`
on the float model; the rewritten model's activation ranges must be calibrated afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from onnxcomp import ir
from onnxcomp.calibration.channels import ChannelStats
from onnxcomp.errors import ConfigError, FormatError
from onnxcomp.formats import ElementFormat, IntegerFormat, MXFormat, get_format
from onnxcomp.quant.equalize import as_matrix, input_channel_absmax, scale_input_channels
from onnxcomp.quant.migration import SmoothTarget, channel_weight, migrate_scales, smooth_targets
from onnxcomp.quant.qparams import dequantize, qparams_for_range, quantize
from onnxcomp.quant.spec import Granularity, NodeSpec, TensorSpec
from onnxcomp.quant.weights import quantize_weight

log = logging.getLogger(__name__)

SpecFor = Callable[[ir.Node], NodeSpec | None]
#: Bounds of a migration scale (channels with a zero statistic keep s = 1).
S_MIN, S_MAX = 1e-5, 1e5
#: SmoothQuant's alpha grid for ``alpha="auto"`` and AWQ's (20 points, as the reference code).
SQ_GRID = tuple(round(0.05 * i, 2) for i in range(21))
AWQ_GRID = tuple(i / 20 for i in range(20))
#: Simulation spec when ``spec_for`` is not given: W8A8 (int8 per channel, uint8 per tensor).
DEFAULT_SPEC = NodeSpec(TensorSpec("int8", Granularity("channel")), TensorSpec("uint8", symmetric=False))


# --- simulation ----------------------------------------------------------------------------


def _act_qdq(spec: TensorSpec | None, x: np.ndarray) -> np.ndarray:
    """Rows ``x`` (float64) fake-quantized as activations: per tensor from their min/max, or per row."""
    if spec is None:
        return x
    fmt = get_format(spec.dtype)
    x32 = x.astype(np.float32)
    if isinstance(fmt, MXFormat):
        return fmt.quantize_dequantize(x32, axis=-1).astype(np.float64)
    per_row = spec.granularity.kind == "token"
    lo = x32.min(axis=1, keepdims=True) if per_row else x32.min()
    hi = x32.max(axis=1, keepdims=True) if per_row else x32.max()
    assert isinstance(fmt, (IntegerFormat, ElementFormat))
    scale, zp = qparams_for_range(fmt, lo, hi, spec.symmetric)
    return dequantize(fmt, quantize(fmt, x32, scale, zp), scale, zp).astype(np.float64)


def _weight_qdq(node: ir.Node, w: np.ndarray, spec: TensorSpec | None, rows: np.ndarray) -> np.ndarray:
    """The dequantized weight (layout of ``w``) per ``spec`` (``output_mse`` weighted by the rows)."""
    if spec is None:
        return w
    layout = ir.weight_layout(node.op, w.ndim, bool(node.attrs.get("transB", 0)))
    energy = None
    if spec.observer == "output_mse":
        energy = np.mean(rows * rows, axis=0)
    return quantize_weight(w.astype(np.float32), spec, layout, ir.node_key(node), input_energy=energy).dequantized


def simulated_error(
    target: SmoothTarget, rows: np.ndarray, s: np.ndarray, specs: list[NodeSpec | None], activations: bool = True
) -> float:
    """sum over the group of ||X W - Qa(X/s) M(Qw(s W))||^2 on ``rows`` (the current weights)."""
    x = np.asarray(rows, np.float64)
    xs = x / s
    total = 0.0
    for node, spec in zip(target.nodes, specs, strict=True):
        w = channel_weight(node)
        ref = x @ as_matrix(node, w)
        act = spec.activations if (spec is not None and activations) else None
        wq = _weight_qdq(node, scale_input_channels(node, w, s), spec.weights if spec else None, xs)
        diff = ref - _act_qdq(act, xs) @ as_matrix(node, wq)
        total += float(np.einsum("ij,ij->", diff, diff))
    return total


# --- the two methods -------------------------------------------------------------------------


def smooth_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^a / max|W_j|^(1-a), clipped to [S_MIN, S_MAX] (1 where either is 0), float32-exact."""
    a, w = np.asarray(act_absmax, np.float64), np.asarray(weight_absmax, np.float64)
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, S_MIN, S_MAX).astype(np.float32).astype(np.float64)


def _stats_for(target: SmoothTarget, stats: Mapping[str, ChannelStats]) -> ChannelStats | None:
    st = stats.get(target.tensor)
    if st is None or st.count == 0 or st.channels != target.channels:
        log.debug("smooth: no usable statistics for %r; group left as is", target.tensor)
        return None
    return st


def _entries(target: SmoothTarget, s: np.ndarray, alpha: float, extra: dict[str, Any]) -> list[dict[str, Any]]:
    base = {
        "tensor": target.tensor,
        "group": [ir.node_key(n) for n in target.nodes],
        "alpha": float(alpha),
        "fold": target.fold.describe(),
        "s_min": float(s.min()),
        "s_max": float(s.max()),
        **extra,
    }
    return [{"node": ir.node_key(n), **base} for n in target.nodes]


def smoothquant(
    graph: ir.Graph,
    nodes: Iterable[ir.Node],
    stats: Mapping[str, ChannelStats],
    alpha: float | str = 0.5,
    spec_for: SpecFor | None = None,
) -> list[dict[str, Any]]:
    """SmoothQuant on the groups of :func:`smooth_targets`; one record entry per smoothed node.

    ``stats`` maps each group's input tensor name to its ChannelStats (axis: the target's
    ``axis``). ``alpha`` in [0, 1], or ``"auto"``: per group the alpha of :data:`SQ_GRID` with the
    least simulated W/A output error on the reservoir rows (specs from ``spec_for``; default W8A8).
    """
    auto = alpha == "auto"
    if not auto and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
        raise ConfigError(f"smoothquant alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
    record: list[dict[str, Any]] = []
    for target in smooth_targets(graph, nodes):
        st = _stats_for(target, stats)
        if st is None:
            continue
        amax = st.amax()
        wmax = np.max([input_channel_absmax(n, channel_weight(n)) for n in target.nodes], axis=0)
        extra: dict[str, Any] = {}
        if auto:
            specs = [(spec_for(n) if spec_for else DEFAULT_SPEC) for n in target.nodes]
            rows = st.rows().astype(np.float64)
            try:
                losses = [simulated_error(target, rows, smooth_scales(amax, wmax, a), specs) for a in SQ_GRID]
            except (ConfigError, FormatError) as exc:
                log.debug("smoothquant: %r left as is: %s", target.tensor, exc)
                continue
            best = int(np.argmin(losses))
            chosen = SQ_GRID[best]
            extra = {"loss": losses[best], "loss_unsmoothed": simulated_error(target, rows, np.ones_like(amax), specs)}
        else:
            chosen = float(alpha)
        s = smooth_scales(amax, wmax, chosen)
        migrate_scales(graph, target, s)
        record.extend(_entries(target, s, chosen, extra))
    return record


def awq_scales(act_mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|X_j|^a / sqrt(max * min) (AWQ's normalisation), clipped, float32-exact."""
    m = np.asarray(act_mean_abs, np.float64)
    positive = m[m > 0]
    if positive.size == 0:
        return np.ones_like(m)
    s = np.where(m > 0, m, positive.min()) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, S_MIN, S_MAX).astype(np.float32).astype(np.float64)


def awq(
    graph: ir.Graph, nodes: Iterable[ir.Node], stats: Mapping[str, ChannelStats], spec_for: SpecFor
) -> list[dict[str, Any]]:
    """Activation-aware weight scaling for weight-only nodes; one record entry per node.

    Per group, ``a`` of :data:`AWQ_GRID` minimising sum ||X W - X Q(W s)/s||^2 on the reservoir
    rows (weights per ``spec_for(node).weights``, any format); ``a = 0`` is plain round-to-nearest,
    so the chosen loss never exceeds RTN's. Groups whose best ``a`` is 0 are left unchanged.
    """
    record: list[dict[str, Any]] = []
    for target in smooth_targets(graph, nodes):
        st = _stats_for(target, stats)
        specs = [spec_for(n) for n in target.nodes]
        if st is None or all(sp is None or sp.weights is None for sp in specs):
            continue
        rows, mean = st.rows().astype(np.float64), st.mean_abs()
        try:
            losses = [simulated_error(target, rows, awq_scales(mean, a), specs, activations=False) for a in AWQ_GRID]
        except (ConfigError, FormatError) as exc:
            log.debug("awq: %r left as is: %s", target.tensor, exc)
            continue
        best = int(np.argmin(losses))
        s = awq_scales(mean, AWQ_GRID[best])
        if AWQ_GRID[best] > 0:
            migrate_scales(graph, target, s)
        extra = {"loss_before": losses[0], "loss_after": losses[best], "applied": AWQ_GRID[best] > 0}
        record.extend(_entries(target, s, AWQ_GRID[best], extra))
    return record
