"""Smoothing factors for the record's ``tensor_balance_factor``, read off the weights they scaled.

SmoothQuant multiplies input channel i of a layer's weight by s[i] and divides the activation
by s, folded upstream: when the upstream op is another quantized layer, that layer's output
channel o (weight row and bias) is divided by the downstream factor t[o]. The algorithm keeps
neither, so per layer W_after / W_before = s[i] / t[o] is solved for s: t from the bias ratio
(1 where the bias is zero or absent and the rows agree), s[i] at the largest |W_before| of
column i whose t is known. What AMCT records for its DMQ balancer is this s.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from onnxcomp import ir


def weight_snapshot(graph: ir.Graph, ops: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """node name -> copies of its constant float weight (input 1) and bias (input 2, or None)."""
    snapshot: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for node in ir.iter_nodes(graph, tuple(ops)):
        if len(node.inputs) > 1:
            value = ir.folded_value(node.inputs[1])
            if value is not None and value.dtype == np.float32:
                bias = ir.folded_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
                snapshot[node.name] = (np.array(value, copy=True), None if bias is None else np.array(bias, copy=True))
    return snapshot


def _matrix(w: np.ndarray, out_axis: int, in_axis: int) -> np.ndarray:
    """(C_out, C_in, rest) view of a weight in float64."""
    moved = np.moveaxis(w.astype(np.float64), (out_axis, in_axis), (0, 1))
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def balance_factors(node: ir.Node, before: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray | None:
    """Per input channel s of ``node`` (float32), or None when its weight is unchanged or s is not determined."""
    w_before, b_before = before
    after = ir.folded_value(node.inputs[1])
    if after is None or after.shape != w_before.shape or np.array_equal(after, w_before):
        return None
    if node.op == "ConvTranspose" or int(node.attrs.get("group", 1)) != 1:
        return None  # SmoothQuant leaves these alone; a change came from elsewhere
    layout = ir.weight_layout(node.op, w_before.ndim, bool(node.attrs.get("transB", 0)))
    wb = _matrix(w_before, layout.channel_axis, layout.reduction_axis)
    wa = _matrix(after, layout.channel_axis, layout.reduction_axis)
    outs, ins = wb.shape[0], wb.shape[1]
    t = np.ones(outs)
    known = np.ones(outs, bool)
    b_after = ir.folded_value(node.inputs[2]) if b_before is not None and len(node.inputs) > 2 else None
    if b_before is not None and b_after is not None and b_after.size == outs and b_before.size == outs:
        bb, ba = b_before.astype(np.float64).reshape(-1), b_after.astype(np.float64).reshape(-1)
        nonzero = bb != 0
        t[nonzero] = bb[nonzero] / np.where(ba[nonzero] != 0, ba[nonzero], np.nan)
        known = nonzero & np.isfinite(t)
        if not known.any():
            known[:] = True  # an all-zero bias says nothing: assume no upstream fold, checked below
            t[:] = 1.0
    # the best-determined entry per input channel among the rows whose t is known
    weight = np.abs(wb).max(axis=2) * known[:, None]
    o = weight.argmax(axis=0)
    k = np.abs(wb[o, np.arange(ins)]).argmax(axis=1)
    picked = wb[o, np.arange(ins), k]
    s = np.where(picked != 0, wa[o, np.arange(ins), k] / np.where(picked != 0, picked, 1.0) * t[o], 1.0)
    predicted = wb * (s[None, :, None] / t[:, None, None])
    if not np.allclose(predicted, wa, rtol=1e-4, atol=1e-6 * float(np.abs(wa).max(initial=0.0))):
        return None  # not of the form s[i] / t[o] with this t: no factor is claimed
    return s.astype(np.float32)
