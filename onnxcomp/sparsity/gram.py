"""A consumer layer as a matrix product, and streaming ``X^T X`` of its input on calibration data.

A sink (Conv, Gemm, MatMul) computes ``y = X @ Wm + b`` where each row of the *design matrix* X is
one output position's receptive field (Conv: the ``Cin*kh*kw`` patch; Gemm/MatMul: one input row)
and each column belongs to one input channel (:attr:`SinkMatrix.owner`). :class:`GramAccumulator`
streams batches of the sink's input and keeps only ``[X 1]^T [X 1]`` (float64, ``(d+1)^2``), so
memory does not grow with the data; Conv positions are subsampled to ``max_rows`` per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxcomp import ir
from onnxcomp.ir import describe, folded_value
from onnxcomp.sparsity.coupling import Sink


@dataclass
class SinkMatrix:
    """``y = X @ wm + bias`` over the design columns of one sink (float64)."""

    sink: Sink
    wm: np.ndarray  # (d, Cout)
    bias: np.ndarray | None  # effective bias per output channel, None when there is none
    owner: np.ndarray  # (d,) input channel of each design column
    shape: tuple[int, ...] = ()  # the node's weight shape before pruning

    @property
    def node(self) -> ir.Node:
        return self.sink.node

    @property
    def theta(self) -> np.ndarray:
        """``[wm; bias]``: the parameters acting on ``[X 1]`` (bias row zero when absent)."""
        bias = self.bias if self.bias is not None else np.zeros(self.wm.shape[1])
        return np.vstack([self.wm, bias[None, :]])


def _gemm_bias(node: ir.Node, cout: int) -> np.ndarray | str | None:
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    c = folded_value(node.inputs[2])
    if c is None or c.ndim > 2 or (c.ndim and c.shape[-1] not in (1, cout)) or (c.ndim == 2 and c.shape[0] != 1):
        return f"the bias C of {describe(node)} is not constant per output column"
    beta = float(node.attrs.get("beta", 1.0))
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (cout,)) * beta


def sink_matrix(sink: Sink) -> SinkMatrix | str:
    """The matrix form of ``sink``, or why it has none."""
    node = sink.node
    weight = folded_value(node.inputs[1])
    if weight is None:
        return f"the weight of {describe(node)} is not constant"
    w = weight.astype(np.float64)
    owner = sink.layout.owner()
    if node.op == "Conv":
        cout = w.shape[0]
        kernel = math.prod(w.shape[2:])
        wm = w.reshape(cout, -1).T
        owner = np.repeat(owner, kernel)
        conv_bias = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = folded_value(node.inputs[2])
            if b is None:
                return f"the bias of {describe(node)} is not constant"
            conv_bias = b.astype(np.float64)
        return SinkMatrix(sink, wm, conv_bias, owner, w.shape)
    if node.op == "Gemm":
        wm = (w.T if node.attrs.get("transB", 0) else w) * float(node.attrs.get("alpha", 1.0))
        bias = _gemm_bias(node, wm.shape[1])
        return bias if isinstance(bias, str) else SinkMatrix(sink, wm, bias, owner, w.shape)
    return SinkMatrix(sink, w, None, owner, w.shape)  # MatMul: a refit bias becomes a new Add


def weight_from_matrix(sm: SinkMatrix, wm: np.ndarray, kept_channels: int) -> np.ndarray:
    """A refit ``wm`` (kept design columns only) back in the node's weight layout."""
    node = sm.node
    if node.op == "Conv":
        return wm.T.reshape(sm.shape[0], kept_channels, *sm.shape[2:])
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return wm.T
    return wm


def _conv_pads(node: ir.Node, spatial: list[int], kernel: list[int], strides: list[int], dil: list[int]) -> list[int]:
    nd = len(spatial)
    mode = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            out = -(-spatial[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial[i], 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + nd] = (small, big) if mode == "SAME_UPPER" else (big, small)
        return pads
    if mode == "VALID":
        return [0] * (2 * nd)
    return [int(p) for p in node.attrs.get("pads", [0] * (2 * nd))]


Ints = list[int]


def _conv_geometry(node: ir.Node, x_shape: tuple[int, ...]) -> tuple[Ints, Ints, Ints, Ints, Ints]:
    """(kernel, strides, dilations, pads, output spatial size) of a Conv on an input of ``x_shape``."""
    weight = folded_value(node.inputs[1])
    assert weight is not None  # only sinks with a SinkMatrix get here: sink_matrix checked the weight
    kernel = list(weight.shape[2:])
    nd = len(kernel)
    strides = [int(s) for s in node.attrs.get("strides", [1] * nd)]
    dil = [int(d) for d in node.attrs.get("dilations", [1] * nd)]
    spatial = list(x_shape[2:])
    pads = _conv_pads(node, spatial, kernel, strides, dil)
    out = [(spatial[i] + pads[i] + pads[i + nd] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    return kernel, strides, dil, pads, out


def conv_patches(node: ir.Node, x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Receptive fields ``(len(index), Cin*prod(kernel))`` of a Conv at flat output positions ``index``."""
    kernel, strides, dil, pads, out = _conv_geometry(node, x.shape)
    nd = len(kernel)
    n, *pos = np.unravel_index(index, (x.shape[0], *out))
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    coords = []
    for i in range(nd):
        c = pos[i][:, None] * strides[i] + np.arange(kernel[i])[None, :] * dil[i]
        coords.append(c.reshape((len(index),) + (1,) * i + (kernel[i],) + (1,) * (nd - 1 - i)))
    batch = n.reshape((len(index),) + (1,) * nd)
    # the advanced indices are separated by the slice: numpy puts their broadcast dims first -> (S, k..., C)
    where: tuple[Any, ...] = (batch, slice(None), *coords)
    patches = padded[where]
    return np.moveaxis(patches, -1, 1).reshape(len(index), -1)


def augment(rows: np.ndarray) -> np.ndarray:
    """``[rows 1]``: the design rows with the bias column appended."""
    return np.hstack([rows, np.ones((len(rows), 1))])


def sample_rows(total: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: all of ``total``, or ``max_rows`` of them at random."""
    return np.arange(total) if total <= max_rows else np.sort(rng.choice(total, max_rows, replace=False))


def design_rows(node: ir.Node, x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` of the design matrix a sink sees for input ``x`` (float64, no bias column)."""
    x = np.asarray(x, dtype=np.float64)
    if node.op == "Conv":
        return conv_patches(node, x, index)
    return x.reshape(-1, x.shape[-1])[index]


def output_rows(node: ir.Node, y: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` of a sink's output ``y`` (one row per output position, Cout columns)."""
    y = np.asarray(y, dtype=np.float64)
    if node.op == "Conv":
        y = np.moveaxis(y, 1, -1)
    return y.reshape(-1, y.shape[-1])[index]


def row_count(node: ir.Node, x_shape: tuple[int, ...]) -> int:
    """The number of design rows (output positions) of a sink for an input of ``x_shape``."""
    if node.op == "Conv":
        return x_shape[0] * math.prod(_conv_geometry(node, x_shape)[4])
    return math.prod(x_shape[:-1])


def output_count(node: ir.Node, y_shape: tuple[int, ...]) -> int:
    """The number of output positions (design rows) of a sink's output of ``y_shape``."""
    return math.prod(y_shape[:1] + y_shape[2:]) if node.op == "Conv" else math.prod(y_shape[:-1])


class GramAccumulator:
    """Streaming ``H = [X 1]^T [X 1]`` of one sink's design matrix (float64)."""

    def __init__(self, sm: SinkMatrix, max_rows: int, rng: np.random.Generator) -> None:
        self.sm = sm
        self.max_rows = max_rows
        self.rng = rng
        d = sm.wm.shape[0]
        self.h = np.zeros((d + 1, d + 1))
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        index = sample_rows(row_count(self.sm.node, np.shape(x)), self.max_rows, self.rng)
        a = augment(design_rows(self.sm.node, x, index))
        self.h += a.T @ a
        self.rows += len(a)


class Fanout:
    """Feeds one calibration tensor to every accumulator that reads it."""

    def __init__(self, accumulators: list[GramAccumulator]) -> None:
        self.accumulators = accumulators

    def update(self, x: np.ndarray) -> None:
        for acc in self.accumulators:
            acc.update(x)
