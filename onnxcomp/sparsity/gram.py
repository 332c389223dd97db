"""A consumer layer as a matrix product, and streaming ``X^T X`` of its input on calibration data.

A sink (Conv, Gemm, MatMul) computes ``y = X @ Wm + b`` where each row of the *design matrix* X is
one output position's receptive field (Conv: the ``Cin*kh*kw`` patch; Gemm/MatMul: one input row)
and each column belongs to one input channel (:attr:`SinkMatrix.owner`). :class:`GramAccumulator`
streams batches of the sink's input and keeps only ``[X 1]^T [X 1]`` (float64, ``(d+1)^2``), so
memory does not grow with the data; Conv positions are subsampled to ``max_rows`` per batch.
The generic design-matrix helpers (im2col, row sampling) are in :mod:`onnxcomp.calibration.gram`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxcomp import ir
from onnxcomp.calibration.gram import (
    Fanout,
    LayerView,
    augment,
    batch_rows,
    conv_patches,
    design_rows,
    output_count,
    output_rows,
    row_count,
    sample_rows,
    seed_of,
)
from onnxcomp.errors import CalibrationError
from onnxcomp.ir import describe, folded_value
from onnxcomp.sparsity.coupling import Sink

# the generic design-matrix helpers live in onnxcomp.calibration.gram; re-exported for sparsity
__all__ = [
    "Fanout",
    "GramAccumulator",
    "SinkMatrix",
    "augment",
    "conv_patches",
    "design_rows",
    "output_count",
    "output_rows",
    "row_count",
    "sample_rows",
    "sink_matrix",
    "weight_from_matrix",
]


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


class GramAccumulator:
    """Streaming ``H = [X 1]^T [X 1]`` of one sink's design matrix (float64), mergeable.

    At most ``max_rows`` design rows per batch, drawn with a generator seeded by the batch's index
    (:func:`~onnxcomp.calibration.gram.batch_rows`), so sharded calibration samples the same rows;
    a copy sent to a worker (:meth:`blank`) carries the layer's geometry, not the sink (``sm`` is
    None there).
    """

    def __init__(self, sm: SinkMatrix, max_rows: int, rng: np.random.Generator) -> None:
        self.sm = sm
        self.layer = LayerView.of(sm.node)
        self.max_rows = max_rows
        self.seed = seed_of(rng)
        d = sm.wm.shape[0]
        self.h = np.zeros((d + 1, d + 1))
        self.rows = 0
        self.batch = 0  # the index (in the whole stream) of the next batch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "sm": None}  # the sink links the whole graph and its weights

    def blank(self, memo: dict[int, Any] | None = None) -> GramAccumulator:
        fresh = copy.copy(self)
        fresh.h, fresh.rows, fresh.batch = np.zeros_like(self.h), 0, 0
        return fresh

    def seek(self, index: int) -> None:
        self.batch = index

    def update(self, x: np.ndarray) -> None:
        index = batch_rows(row_count(self.layer, np.shape(x)), self.max_rows, self.seed, self.batch)
        self.batch += 1
        a = augment(design_rows(self.layer, x, index))
        self.h += a.T @ a
        self.rows += len(a)

    def merge(self, other: GramAccumulator) -> None:
        if other.h.shape != self.h.shape or other.layer.label != self.layer.label:
            raise CalibrationError(f"{self.layer.label}: cannot merge the statistics of {other.layer.label}")
        self.h += other.h
        self.rows += other.rows
