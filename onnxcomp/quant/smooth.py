"""Per-input-channel scale migration before quantization: SmoothQuant and AWQ.

Both rewrite ``y = x W`` as ``y = (x / s) (s W)``: W's input-channel rows times ``s``, ``1/s``
folded upstream; the float outputs do not change (within rounding). :func:`smooth_targets` groups
the candidates (MatMul with a constant 2-D weight, Gemm with ``transA=0``, Conv of any kernel and
group count) by input tensor (one shared ``s`` per group) and finds where ``1/s`` goes.

Fold sites, walking up from the shared tensor ``T`` when every reader of ``T`` is in the group and
``T`` is not a graph input/output (each tensor on the walk must feed only the next node):

* through ``Relu``, ``LeakyRelu`` and ``Identity`` (positively homogeneous: ``s > 0``), and through
  ``Add``/``Sub`` of a constant (the constant is divided by ``s``; the variable operand must carry
  the channel axis unbroadcast);
* into ``Mul`` by a constant (the constant times ``1/s``), ``Div`` by a constant (the divisor
  times ``s``), ``LayerNormalization`` over the last axis (scale and bias), inference
  ``BatchNormalization`` (scale and B), ``Conv`` (output channels of W and B), ``Gemm`` (output
  channels of B and C) or ``MatMul`` with a constant 2-D weight (its columns);
* otherwise an inserted ``Mul`` by the constant ``1/s`` that only the group reads.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcomp import ir
from onnxcomp.calibration.channels import ChannelStats
from onnxcomp.errors import ConfigError, FormatError
from onnxcomp.formats import ElementFormat, IntegerFormat, MXFormat, get_format
from onnxcomp.quant.equalize import as_matrix, input_channel_absmax, scale_input_channels
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
_THROUGH = ("Relu", "LeakyRelu", "Identity")


@dataclass
class FoldSite:
    """Where ``1/s`` goes: ``kind`` is the absorbing op or ``"inserted Mul"``."""

    kind: str
    node: ir.Node | None = None
    index: int = 0  # Mul/Div: the constant operand
    shifts: list[tuple[ir.Node, int]] = field(default_factory=list)  # Add/Sub constants divided by s
    through: list[str] = field(default_factory=list)  # names of the homogeneous nodes crossed

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "node": ir.node_key(self.node) if self.node is not None else None,
            "through": list(self.through),
            "shifted": [ir.node_key(n) for n, _ in self.shifts],
        }


@dataclass
class SmoothTarget:
    """A group of candidate nodes reading one tensor, the channel axis and the fold site."""

    tensor: str
    nodes: list[ir.Node]
    axis: int  # channel axis of the activation (for ChannelStats): -1 or 1
    channels: int
    fold: FoldSite
    trailing: int  # dims after the channel axis (0 for MatMul/Gemm, spatial rank for Conv)


# --- weights by input channel --------------------------------------------------------------


def _candidate(node: ir.Node) -> tuple[np.ndarray, int, int] | str:
    """(weight, channels, trailing dims) of a candidate node, or why it is not one."""
    if node.op not in ("MatMul", "Gemm", "Conv") or not ir.is_onnx_op(node) or len(node.inputs) < 2:
        return f"{ir.describe(node)} is not a MatMul, Gemm or Conv"
    if ir.is_constant(node.inputs[0]):
        return f"the input of {ir.describe(node)} is a constant"
    w = ir.float_weight(node, 1, "weight")
    if isinstance(w, str):
        return w
    if node.op == "MatMul":
        return (w, w.shape[0], 0) if w.ndim == 2 else f"the weight of {ir.describe(node)} is not 2-D"
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return f"{ir.describe(node)} has transA=1"
        return w, w.shape[1 if node.attrs.get("transB", 0) else 0], 0
    if w.ndim < 3:
        return f"the weight of {ir.describe(node)} has rank {w.ndim}"
    return w, w.shape[1] * int(node.attrs.get("group", 1)), w.ndim - 2


# --- fold sites ----------------------------------------------------------------------------


def _split_const(node: ir.Node) -> tuple[ir.Tensor, int] | None:
    if len(node.inputs) != 2:
        return None
    const = [i for i, t in enumerate(node.inputs) if ir.is_constant(t)]
    if len(const) != 1:
        return None
    value = ir.constant_value(node.inputs[const[0]])
    if value is None or value.dtype.name not in ir.FLOAT_DTYPES:
        return None
    return node.inputs[1 - const[0]], const[0]


def _consts_float(node: ir.Node, indices: Iterable[int]) -> bool:
    for i in indices:
        if len(node.inputs) > i and node.inputs[i].name and isinstance(ir.float_weight(node, i, "input"), str):
            return False
    return True


def _absorber(node: ir.Node, shapes: ir.Shapes, tensor: ir.Tensor, trailing: int) -> FoldSite | None:
    """The fold site when ``node`` (producing ``tensor``) absorbs 1/s, else None."""
    op = node.op
    rank = shapes.rank(tensor)
    axis1 = rank is not None and rank - 1 - trailing == 1  # channels on axis 1
    if op in ("Mul", "Div"):
        split = _split_const(node)
        if split is not None and (op == "Mul" or split[1] == 1):
            return FoldSite(op, node, split[1])
    elif op == "LayerNormalization" and trailing == 0 and len(node.inputs) >= 2:
        last = int(node.attrs.get("axis", -1)) in (-1, -1 if rank is None else rank - 1)
        if last and node.outputs[0] is tensor and _consts_float(node, (1, 2)) and ir.is_constant(node.inputs[1]):
            if len(node.inputs) < 3 or not node.inputs[2].name or ir.is_constant(node.inputs[2]):
                return FoldSite(op, node)
    elif op == "BatchNormalization" and axis1 and len(node.outputs) == 1 and not node.attrs.get("training_mode", 0):
        if all(ir.is_constant(t) for t in node.inputs[1:5]) and _consts_float(node, (1, 2)):
            return FoldSite(op, node)
    elif op in ("Conv", "Gemm", "MatMul") and len(node.inputs) >= 2 and not ir.is_constant(node.inputs[0]):
        w = ir.float_weight(node, 1, "weight")
        bias = len(node.inputs) > 2 and node.inputs[2].name
        if isinstance(w, str) or (bias and not (ir.is_constant(node.inputs[2]) and _consts_float(node, (2,)))):
            return None
        if op == "Conv" and axis1 and w.ndim == rank:
            return FoldSite(op, node)
        if op in ("Gemm", "MatMul") and trailing == 0 and w.ndim == 2:
            return FoldSite(op, node)
    return None


def _fold_site(graph: ir.Graph, shapes: ir.Shapes, target: SmoothTarget) -> FoldSite:
    inserted = FoldSite("inserted Mul")
    tensor = graph.tensors()[target.tensor]
    group = {id(n) for n in target.nodes}
    if ir.is_graph_output(graph, tensor) or any(t is tensor for t in graph.inputs):
        return inserted
    if any(id(n) not in group for n in ir.consumers(tensor)):
        return inserted
    cur, reader = tensor, None
    shifts: list[tuple[ir.Node, int]] = []
    through: list[str] = []
    for _ in range(32):
        if reader is not None and ir.exclusive_reason(graph, cur, reader, reader) is not None:
            return inserted
        node = ir.producer(cur)
        if node is None or not ir.is_onnx_op(node) or node.outputs[0] is not cur:
            return inserted
        site = _absorber(node, shapes, cur, target.trailing)
        if site is not None:
            site.shifts, site.through = shifts, through
            return site
        if node.op in _THROUGH and len(node.outputs) == 1:
            through.append(ir.node_key(node))
            cur, reader = node.inputs[0], node
            continue
        split = _split_const(node) if node.op in ("Add", "Sub") else None
        if split is None or shapes.dim(split[0], -1 - target.trailing) != target.channels:
            return inserted
        shifts.append((node, split[1]))
        cur, reader = split[0], node
    return inserted


def smooth_targets(graph: ir.Graph, nodes: Iterable[ir.Node]) -> list[SmoothTarget]:
    """Groups of the candidate ``nodes`` by input tensor, with their fold sites (see module doc).

    Nodes that are not candidates are left out (the reason is logged at debug level). Nodes of
    different kinds reading one tensor (channels on different axes) each get an inserted Mul.
    """
    groups: dict[tuple[str, int], SmoothTarget] = {}
    for node in nodes:
        cand = _candidate(node)
        if isinstance(cand, str):
            log.debug("smooth: %s", cand)
            continue
        _, channels, trailing = cand
        key = (node.inputs[0].name, trailing)
        if key in groups and groups[key].channels == channels:
            groups[key].nodes.append(node)
        elif key not in groups:
            axis = -1 if trailing == 0 else 1
            groups[key] = SmoothTarget(node.inputs[0].name, [node], axis, channels, FoldSite("inserted Mul"), trailing)
    shapes = ir.Shapes(graph)
    kinds: dict[str, int] = {}
    for name, _ in groups:
        kinds[name] = kinds.get(name, 0) + 1
    for target in groups.values():
        if kinds[target.tensor] == 1:
            target.fold = _fold_site(graph, shapes, target)
    return list(groups.values())


def _weight(node: ir.Node) -> np.ndarray:
    w = ir.constant_value(node.inputs[1])
    assert w is not None
    return w


def _write(graph: ir.Graph, node: ir.Node, index: int, value: np.ndarray, like: np.ndarray) -> None:
    if not np.isfinite(value).all():
        raise ConfigError(f"scale migration would make input {index} of {ir.describe(node)} non-finite")
    ir.write_input(graph, node, index, np.asarray(value).astype(like.dtype))


def _apply(graph: ir.Graph, target: SmoothTarget, s: np.ndarray) -> None:
    """W rows *= s for every node of the group; 1/s folded at the target's site."""
    for node in target.nodes:
        w = _weight(node)
        _write(graph, node, 1, scale_input_channels(node, w, s), w)
    inv = 1.0 / s
    vec = inv.reshape((-1,) + (1,) * target.trailing)
    site = target.fold
    for node, idx in site.shifts:
        c = ir.constant_value(node.inputs[idx])
        assert c is not None
        _write(graph, node, idx, c.astype(np.float64) * vec, c)
    node = site.node
    if node is None:
        tensor = graph.tensors()[target.tensor]
        const = ir.make_constant(ir.unique_name(graph, f"{target.tensor}_smooth_scale"), vec.astype(np.float32))
        dtype = _weight(target.nodes[0]).dtype
        if dtype != np.float32:
            const = ir.make_constant(const.name, vec.astype(dtype))
        out = ir.make_variable(graph, f"{target.tensor}_smoothed", tensor.dtype, tensor.shape)
        ir.make_node(graph, "Mul", [tensor, const], [out], f"{ir.node_key(target.nodes[0])}/smooth_mul")
        for reader in target.nodes:
            for i, t in enumerate(reader.inputs):
                if t is tensor:
                    reader.inputs[i] = out
        return
    scaled = {"Mul": [(site.index, vec)], "Div": [(site.index, 1.0 / vec)]}.get(node.op)
    if scaled is None and node.op in ("LayerNormalization", "BatchNormalization"):
        scaled = [(1, inv), (2, inv)]
    if scaled is None:  # Conv / Gemm / MatMul: output channels of the weight, and the bias
        w = _weight(node)
        if node.op == "Conv":
            wvec = inv.reshape((-1,) + (1,) * (w.ndim - 1))
        elif node.op == "Gemm" and node.attrs.get("transB", 0):
            wvec = inv[:, None]
        else:
            wvec = inv[None, :]
        scaled = [(1, wvec), (2, inv)]
    for idx, factor in scaled:
        if len(node.inputs) > idx and node.inputs[idx].name:
            c = ir.constant_value(node.inputs[idx])
            assert c is not None
            _write(graph, node, idx, c.astype(np.float64) * factor, c)


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
        w = _weight(node)
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
        wmax = np.max([input_channel_absmax(n, _weight(n)) for n in target.nodes], axis=0)
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
        _apply(graph, target, s)
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
            _apply(graph, target, s)
        extra = {"loss_before": losses[0], "loss_after": losses[best], "applied": AWQ_GRID[best] > 0}
        record.extend(_entries(target, s, AWQ_GRID[best], extra))
    return record
