"""One block: a quantized layer and its cheap elementwise tail, forward and backward in numpy.

The tail is what follows the layer up to the next layer's input when every step is one
elementwise op with constant parameters (Relu, LeakyRelu, Clip, HardSigmoid, HardSwish, Sigmoid,
Tanh, Gelu); a MatMul's following constant ``Add`` is its bias. The reconstruction target is the
teacher's tensor at the block's end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from onnxcomp import ir
from onnxcomp.quant.distill.rows import Layer, matmul_rows

TAIL_OPS = ("Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Gelu")
_SQRT1_2 = 1.0 / math.sqrt(2.0)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz & Stegun 7.1.26): numpy has none and scipy is no dependency."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


@dataclass(frozen=True)
class Tail:
    """One elementwise op after the layer, with its constant parameters."""

    op: str
    params: tuple[float, ...] = ()
    mode: str = ""  # Gelu approximate

    def forward(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(f(y), f'(y))."""
        op, p = self.op, self.params
        if op == "Relu":
            return np.maximum(y, 0.0), (y > 0).astype(y.dtype)
        if op == "LeakyRelu":
            return np.where(y > 0, y, p[0] * y), np.where(y > 0, 1.0, p[0]).astype(y.dtype)
        if op == "Clip":
            return np.clip(y, p[0], p[1]), ((y > p[0]) & (y < p[1])).astype(y.dtype)
        if op in ("HardSigmoid", "HardSwish"):
            alpha, beta = p if op == "HardSigmoid" else (1.0 / 6.0, 0.5)
            raw = alpha * y + beta
            hs = np.clip(raw, 0.0, 1.0)
            dhs = np.where((raw > 0) & (raw < 1), alpha, 0.0)
            if op == "HardSigmoid":
                return hs, dhs.astype(y.dtype)
            return y * hs, (hs + y * dhs).astype(y.dtype)
        if op == "Sigmoid":
            s = 1.0 / (1.0 + np.exp(-y))
            return s, s * (1.0 - s)
        if op == "Tanh":
            t = np.tanh(y)
            return t, 1.0 - t * t
        if op == "Gelu" and self.mode == "tanh":
            c = math.sqrt(2.0 / math.pi)
            inner = c * (y + 0.044715 * y**3)
            t = np.tanh(inner)
            d = 0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * y * y)
            return 0.5 * y * (1.0 + t), d
        assert op == "Gelu"
        cdf = 0.5 * (1.0 + _erf(y * _SQRT1_2))
        pdf = np.exp(-0.5 * y * y) / math.sqrt(2.0 * math.pi)
        return y * cdf, cdf + y * pdf


def _scalar(t: ir.Tensor) -> float | None:
    value = ir.folded_value(t)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def tail_of(node: ir.Node) -> Tail | None:
    """The :class:`Tail` of an elementwise node with constant parameters, or None."""
    a = node.attrs
    if node.op == "Clip":
        lo = _scalar(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else a.get("min", -np.inf)
        hi = _scalar(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else a.get("max", np.inf)
        if lo is None or hi is None:
            return None
        return Tail("Clip", (float(lo), float(hi)))
    if node.op == "LeakyRelu":
        return Tail("LeakyRelu", (float(a.get("alpha", 0.01)),))
    if node.op == "HardSigmoid":
        return Tail("HardSigmoid", (float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))))
    if node.op == "Gelu":
        mode = a.get("approximate", "none")
        return Tail("Gelu", mode=mode.decode() if isinstance(mode, bytes) else str(mode))
    return Tail(node.op) if node.op in TAIL_OPS and len(node.inputs) == 1 else None


@dataclass
class Block:
    """A quantized layer, its bias (None when it has none), its tail and the tensor the block ends at."""

    node: ir.Node
    layer: Layer
    input_name: str
    output_name: str
    tails: list[Tail] = field(default_factory=list)
    bias_owner: tuple[ir.Node, int] | None = None  # (node, input index) holding the bias constant


def find_tail(graph: ir.Graph, node: ir.Node, layer: Layer) -> tuple[list[Tail], str, tuple[ir.Node, int] | None]:
    """(tail ops, the tensor the block ends at, a MatMul's bias Add) following ``node``."""
    tails: list[Tail] = []
    bias: tuple[ir.Node, int] | None = None
    current = node.outputs[0]
    while not ir.is_graph_output(graph, current):
        users = ir.consumers(current)
        if len(users) != 1:
            break
        user = users[0]
        if user.op == "Add" and node.op == "MatMul" and bias is None and not tails and len(user.inputs) == 2:
            k = 1 if user.inputs[0] is current else 0
            value = ir.folded_value(user.inputs[k])
            if value is None or value.size != layer.out_channels or value.shape[-1] != layer.out_channels:
                break
            if not isinstance(ir.fold_constant_input(graph, user, k), ir.Tensor):
                break
            bias = (user, k)
        else:
            tail = tail_of(user) if user.inputs and user.inputs[0] is current else None
            if tail is None:
                break
            tails.append(tail)
        current = user.outputs[0]
    return tails, current.name, bias


def forward(
    rows: np.ndarray, matrix: np.ndarray, bias: np.ndarray | None, tails: list[Tail]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Block output rows and the tail derivatives (for :func:`backward`)."""
    matrix = matrix.astype(rows.dtype, copy=False)  # float32 rows: BLAS sgemm (float64 is 10-30x slower here)
    if matrix.shape[0] == 1:
        y = rows[:, 0, :] @ matrix[0].T
    elif matrix.shape[1] == 1:  # depthwise: one output per group, a few taps (elementwise beats batched GEMM)
        y = np.einsum("pgk,gk->pg", rows, matrix[:, 0, :])
    else:
        y = matmul_rows(rows, matrix)
    if bias is not None:
        y = y + bias.astype(y.dtype, copy=False)
    slopes = []
    for tail in tails:
        y, d = tail.forward(y)
        slopes.append(d)
    return y, slopes


def backward(
    grad_out: np.ndarray, rows: np.ndarray, slopes: list[np.ndarray], groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """(d loss / d matrix, d loss / d bias) from d loss / d block output."""
    g = grad_out
    for d in reversed(slopes):
        g = g * d
    grad_bias = g.sum(axis=0)
    if groups == 1:
        grad_matrix = (g.T @ rows[:, 0, :])[None]
    elif g.shape[1] == groups:  # depthwise
        grad_matrix = np.einsum("pg,pgk->gk", g, rows)[:, None, :]
    else:
        per_group = g.reshape(g.shape[0], groups, -1)
        grad_matrix = np.einsum("pgo,pgk->gok", per_group, rows, optimize=True)
    return grad_matrix, grad_bias


def backward_input(grad_out: np.ndarray, slopes: list[np.ndarray], matrix: np.ndarray) -> np.ndarray:
    """d loss / d input rows ``(P, groups, K)`` from d loss / d block output (for a learned input quantizer)."""
    g = grad_out
    for d in reversed(slopes):
        g = g * d
    matrix = matrix.astype(g.dtype, copy=False)
    groups = matrix.shape[0]
    if groups == 1:
        return (g @ matrix[0])[:, None, :]
    if matrix.shape[1] == 1:  # depthwise
        return g[:, :, None] * matrix[:, 0, :][None]
    per_group = g.reshape(g.shape[0], groups, -1)
    return np.einsum("pgo,gok->pgk", per_group, matrix, optimize=True)
