"""Cross-layer equalization (CLE, Nagel et al. 2019, "Data-Free Quantization"), and weight channel views.

For a pair ``y = W2 f(W1 x + b1)`` with ``f`` positively homogeneous (``f(x / s) = f(x) / s`` for
``s > 0``: Relu, LeakyRelu, Clip(0, no max), Identity, or nothing), output channel ``i`` of the
first layer and input channel ``i`` of the second trade a factor ``s_i``:
``W1_i /= s_i``, ``b1_i /= s_i``, ``W2[:, i] *= s_i``, which the float model does not notice. With
``r1_i`` the range (max |w|) of output channel ``i`` of ``W1`` and ``r2_i`` that of input channel
``i`` of ``W2``, ``s_i = sqrt(r1_i / r2_i)`` gives both the range ``sqrt(r1_i * r2_i)``, which
evens out the per-channel ranges a per-tensor weight grid must cover.

Pairs: Conv -> Conv (any group count: a depthwise conv's output channel ``i`` is its input
channel ``i // multiplier``) and Gemm -> Gemm (``transA = 0`` on the second), the first's output
feeding only the activation and the activation's only the second. Chains (Conv -> dw -> Conv of a
MobileNet block) are equalized pair by pair in sweeps until no factor moves by more than ``tol``.

Declined: ``Clip(0, 6)`` (Relu6) pairs, because ``Clip(x / s, 0, 6) != Clip(x, 0, 6 s) / s`` with
one shared bound unless the bound is scaled per channel, which one Clip cannot express. High-bias absorption is left
out: it needs bounds on each pre-activation (BatchNorm's beta - 3 gamma), and the BatchNorms are
already folded into the weights when the quantize pass runs, so it cannot be made exact here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxcomp import ir

log = logging.getLogger(__name__)

_HOMOGENEOUS = ("Relu", "LeakyRelu", "Identity")


# --- weight channel views (shared with quant.smooth) -------------------------------------------


def _groups(node: ir.Node) -> int:
    return int(node.attrs.get("group", 1)) if node.op == "Conv" else 1


def weight_by_input(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """A MatMul/Gemm/Conv weight as (C_in, ...): every entry an input channel multiplies."""
    if node.op == "MatMul":
        return w
    if node.op == "Gemm":
        return w.T if node.attrs.get("transB", 0) else w
    g, cout, cpg = _groups(node), w.shape[0], w.shape[1]
    return np.moveaxis(w.reshape(g, cout // g, cpg, -1), 2, 1).reshape(g * cpg, -1)


def scale_input_channels(node: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``w`` (as float64) with every entry of input channel j multiplied by ``s[j]``."""
    w64 = np.asarray(w, np.float64)
    if node.op == "MatMul":
        return w64 * s[:, None]
    if node.op == "Gemm":
        return w64 * (s[None, :] if node.attrs.get("transB", 0) else s[:, None])
    g, cout, cpg = _groups(node), w.shape[0], w.shape[1]
    return (w64.reshape(g, cout // g, cpg, -1) * s.reshape(g, 1, cpg, 1)).reshape(w.shape)


def input_channel_absmax(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """max |W| per input channel (float64, shape (C_in,))."""
    return np.abs(weight_by_input(node, np.asarray(w, np.float64))).max(axis=1)


def as_matrix(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """A (C_in, N) float64 matrix M with ``x M`` = every output one input row contributes to."""
    w64 = np.asarray(w, np.float64)
    groups = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
    if groups == 1:
        return weight_by_input(node, w64)
    cout, cpg = w.shape[0], w.shape[1]
    opg = cout // groups
    blocks = np.moveaxis(w64.reshape(groups, opg, cpg, -1), 2, 1).reshape(groups, cpg, -1)
    m = np.zeros((groups * cpg, groups * blocks.shape[2]))
    for g in range(groups):
        m[g * cpg : (g + 1) * cpg, g * blocks.shape[2] : (g + 1) * blocks.shape[2]] = blocks[g]
    return m


def _out_axis(node: ir.Node) -> int:
    """The output-channel axis of a Conv/Gemm/MatMul weight."""
    if node.op == "Conv":
        return 0
    return 0 if node.op == "Gemm" and node.attrs.get("transB", 0) else 1


def scale_output_channels(node: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``w`` (as float64) with output channel i multiplied by ``s[i]``."""
    axis = _out_axis(node)
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.asarray(w, np.float64) * s.reshape(shape)


def output_channel_absmax(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """max |W| per output channel (float64)."""
    moved = np.moveaxis(np.abs(np.asarray(w, np.float64)), _out_axis(node), 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


# --- pairs ---------------------------------------------------------------------------------------


@dataclass
class _Pair:
    first: ir.Node
    act: ir.Node | None
    second: ir.Node
    scale: np.ndarray  # cumulative s per channel


def _weighted(node: ir.Node, ops: tuple[str, ...]) -> bool:
    if node.op not in ops or not ir.is_onnx_op(node) or len(node.inputs) < 2:
        return False
    if ir.is_constant(node.inputs[0]) or isinstance(ir.float_weight(node, 1, "weight"), str):
        return False
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return False
    bias = len(node.inputs) > 2 and node.inputs[2].name
    return not bias or not isinstance(ir.float_weight(node, 2, "bias"), str)


def _only_reader(graph: ir.Graph, tensor: ir.Tensor) -> ir.Node | None:
    users = ir.consumers(tensor)
    if len(users) != 1 or ir.is_graph_output(graph, tensor):
        return None
    return users[0]


def _homogeneous(node: ir.Node) -> bool:
    if node.op in _HOMOGENEOUS:
        return len(node.outputs) == 1 and ir.is_onnx_op(node)
    if node.op != "Clip":
        return False
    lo = ir.folded_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
    hi_given = len(node.inputs) > 2 and node.inputs[2].name
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attrs.get("min", -np.inf)) == 0.0 and np.isinf(node.attrs.get("max", np.inf))
    hi = ir.folded_value(node.inputs[2]) if hi_given else None
    return lo is not None and float(lo) == 0.0 and (not hi_given or (hi is not None and bool(np.isposinf(hi))))


def find_pairs(graph: ir.Graph, skip: Iterable[str] = ()) -> list[tuple[ir.Node, ir.Node | None, ir.Node]]:
    """(first, activation or None, second) of every equalizable pair (see module doc)."""
    globs = tuple(skip)
    pairs = []
    for first in ir.iter_nodes(graph, ("Conv", "Gemm")):
        if not _weighted(first, ("Conv", "Gemm")) or ir.match_glob(first.name, globs):
            continue
        nxt = _only_reader(graph, first.outputs[0])
        act = None
        if nxt is not None and nxt.op in (*_HOMOGENEOUS, "Clip"):
            if not _homogeneous(nxt):
                log.debug("equalize: %s -> %s declined: not positively homogeneous", first.name, ir.describe(nxt))
                continue
            act, nxt = nxt, _only_reader(graph, nxt.outputs[0])
        if nxt is None or nxt.op != first.op or not _weighted(nxt, (first.op,)) or ir.match_glob(nxt.name, globs):
            continue
        w1, w2 = ir.constant_value(first.inputs[1]), ir.constant_value(nxt.inputs[1])
        assert w1 is not None and w2 is not None
        if nxt.inputs[0] is not (act.outputs[0] if act is not None else first.outputs[0]):
            continue
        if output_channel_absmax(first, w1).shape[0] != input_channel_absmax(nxt, w2).shape[0]:
            continue
        pairs.append((first, act, nxt))
    return pairs


def _spread(r: np.ndarray) -> float:
    live = r[r > 0]
    return float(live.max() / live.min()) if live.size else 1.0


def equalize(graph: ir.Graph, skip: Iterable[str] = (), sweeps: int = 16, tol: float = 1e-3) -> list[dict[str, Any]]:
    """Cross-layer equalization of every pair of :func:`find_pairs`; one record entry per pair.

    Entries: ``first``, ``activation``, ``second``, ``s_min``/``s_max`` (cumulative factors),
    ``sweeps``, and the spread (max / min over channels) of ``W1``'s per-output-channel ranges and
    ``W2``'s per-input-channel ranges before and after. The float outputs are unchanged.
    """
    found = find_pairs(graph, skip)
    weights: dict[int, np.ndarray] = {}
    biases: dict[int, np.ndarray] = {}
    pairs = []
    for first, act, second in found:
        for node in (first, second):
            weights.setdefault(id(node), np.asarray(ir.constant_value(node.inputs[1]), np.float64))
        if len(first.inputs) > 2 and first.inputs[2].name:
            biases.setdefault(id(first), np.asarray(ir.constant_value(first.inputs[2]), np.float64))
        channels = output_channel_absmax(first, weights[id(first)]).shape[0]
        pairs.append(_Pair(first, act, second, np.ones(channels)))
    before = [
        (
            _spread(output_channel_absmax(p.first, weights[id(p.first)])),
            _spread(input_channel_absmax(p.second, weights[id(p.second)])),
        )
        for p in pairs
    ]
    done = 0
    while done < sweeps:
        done += 1
        moved = 0.0
        for p in pairs:
            r1 = output_channel_absmax(p.first, weights[id(p.first)])
            r2 = input_channel_absmax(p.second, weights[id(p.second)])
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            weights[id(p.first)] = scale_output_channels(p.first, weights[id(p.first)], 1.0 / s)
            if id(p.first) in biases:
                biases[id(p.first)] = biases[id(p.first)] / s  # Gemm's C broadcasts along its last axis
            weights[id(p.second)] = scale_input_channels(p.second, weights[id(p.second)], s)
            p.scale = p.scale * s
            moved = max(moved, float(np.abs(np.log(s)).max()) if s.size else 0.0)
        if moved < tol:
            break
    written: set[int] = set()
    for p in pairs:
        for node in (p.first, p.second):
            if id(node) not in written:
                written.add(id(node))
                _write(graph, node, 1, weights[id(node)])
                if id(node) in biases:
                    _write(graph, node, 2, biases[id(node)])
    record = []
    for p, (sp1, sp2) in zip(pairs, before, strict=True):
        record.append(
            {
                "first": ir.node_key(p.first),
                "activation": p.act.op if p.act is not None else None,
                "second": ir.node_key(p.second),
                "s_min": float(p.scale.min()),
                "s_max": float(p.scale.max()),
                "sweeps": done,
                "w1_spread_before": sp1,
                "w1_spread_after": _spread(output_channel_absmax(p.first, weights[id(p.first)])),
                "w2_spread_before": sp2,
                "w2_spread_after": _spread(input_channel_absmax(p.second, weights[id(p.second)])),
            }
        )
    return record


def _write(graph: ir.Graph, node: ir.Node, index: int, value: np.ndarray) -> None:
    old = ir.constant_value(node.inputs[index])
    assert old is not None
    ir.write_input(graph, node, index, value.astype(old.dtype))
