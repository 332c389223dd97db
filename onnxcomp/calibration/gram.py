"""A layer as a matrix product over its *design matrix*, and streaming ``X^T X`` of it.

A weighted layer (Conv, Gemm, MatMul) computes ``y = X @ Wm (+ b)`` where each row of the design
matrix X is one output position's receptive field (Conv: the ``Cin*kh*kw`` patch, channel-major
like ``W.reshape(Cout, -1)``; Gemm: one row of A, or of ``A^T`` under ``transA``; MatMul: one row
of the last axis) and each column multiplies one element of the weight's reduction.

* The helpers here turn a layer's calibration input into design rows (:func:`design_rows`,
  :func:`conv_patches`) and its output into rows (:func:`output_rows`), with row subsampling
  (:func:`batch_rows`: seeded by the batch's index; :func:`sample_rows`: from a generator) and
  the bias column (:func:`augment`). They take a node or its picklable :class:`LayerView`.
* :class:`InputGram` streams the input and keeps only ``X^T X`` (float64), mergeable, so memory
  does not grow with the data: ``hessian()`` is the mean ``X^T X`` that GPTQ and SparseGPT use
  (the Hessian of the layer's squared output error with respect to one output row of the weight,
  up to the factor 2).
* :class:`Fanout` feeds one tensor to the accumulators of every layer reading it; sharded
  calibration (:mod:`onnxcomp.calibration.shard`) fills empty copies of them in workers and merges
  the results into the caller's accumulators.
* :func:`damped_inverse_cholesky` is the shared optimal-brain-surgeon linear algebra: the upper
  Cholesky factor of the damped ``H^-1``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import numpy as np

from onnxcomp import ir
from onnxcomp.errors import CalibrationError
from onnxcomp.ir import describe, folded_value

from .shard import blank_of, seek, shardable

Ints = list[int]
_GEOMETRY_ATTRS = ("auto_pad", "pads", "kernel_shape", "strides", "dilations", "group", "transA")


@dataclass(frozen=True)
class LayerView:
    """What the design-matrix helpers read of a layer, without the graph around it (it pickles small).

    A collector sent to a calibration worker carries this instead of its ``ir.Node``, whose
    tensors link the whole graph and its weights. ``attrs`` holds the geometry attributes only,
    with ``kernel_shape`` filled in from a constant Conv weight; ``label`` is ``describe(node)``.
    """

    op: str
    attrs: dict[str, Any]
    label: str

    @classmethod
    def of(cls, node: ir.Node) -> LayerView:
        attrs = {k: node.attrs[k] for k in _GEOMETRY_ATTRS if k in node.attrs}
        if node.op == "Conv" and "kernel_shape" not in attrs and folded_value(node.inputs[1]) is not None:
            attrs["kernel_shape"] = conv_kernel(node)
        return cls(node.op, attrs, describe(node))


Layer: TypeAlias = "ir.Node | LayerView"  # what the helpers below accept


def label(node: Layer) -> str:
    """``describe(node)`` for messages, of a node or of its view."""
    return node.label if isinstance(node, LayerView) else describe(node)


def conv_pads(node: Layer, spatial: list[int], kernel: list[int], strides: list[int], dil: list[int]) -> list[int]:
    """The explicit pads (begin..., end...) of a Conv on an input of spatial size ``spatial``."""
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


def conv_kernel(node: Layer) -> Ints:
    """The spatial kernel size of a Conv (its ``kernel_shape``, else its constant weight's shape)."""
    shape = node.attrs.get("kernel_shape")
    if shape is not None:
        return [int(k) for k in shape]
    weight = None if isinstance(node, LayerView) else folded_value(node.inputs[1])
    if weight is None:
        raise CalibrationError(f"{label(node)}: the kernel size is unknown (no kernel_shape, weight not constant)")
    return list(weight.shape[2:])


def conv_geometry(node: Layer, x_shape: tuple[int, ...]) -> tuple[Ints, Ints, Ints, Ints, Ints]:
    """(kernel, strides, dilations, pads, output spatial size) of a Conv on an input of ``x_shape``."""
    kernel = conv_kernel(node)
    nd = len(kernel)
    strides = [int(s) for s in node.attrs.get("strides", [1] * nd)]
    dil = [int(d) for d in node.attrs.get("dilations", [1] * nd)]
    spatial = list(x_shape[2:])
    pads = conv_pads(node, spatial, kernel, strides, dil)
    out = [(spatial[i] + pads[i] + pads[i + nd] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    return kernel, strides, dil, pads, out


def conv_patches(node: Layer, x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Receptive fields ``(len(index), Cin*prod(kernel))`` of a Conv at flat output positions ``index``."""
    kernel, strides, dil, pads, out = conv_geometry(node, x.shape)
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


def sample_rows(total: int, max_rows: int | None, rng: np.random.Generator | None) -> np.ndarray:
    """Sorted row indices: all of ``total``, or ``max_rows`` of them at random (``None``: all)."""
    if max_rows is None or total <= max_rows:
        return np.arange(total)
    if rng is None:
        raise ValueError("row subsampling needs a random generator")
    return np.sort(rng.choice(total, max_rows, replace=False))


def _transposed_a(node: Layer) -> bool:
    return node.op == "Gemm" and bool(node.attrs.get("transA", 0))


def design_rows(node: Layer, x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` of the design matrix a layer sees for input ``x`` (float64, no bias column)."""
    x = np.asarray(x, dtype=np.float64)
    if node.op == "Conv":
        return conv_patches(node, x, index)
    if _transposed_a(node):
        return x.T[index]
    return x.reshape(-1, x.shape[-1])[index]


def output_rows(node: Layer, y: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` of a layer's output ``y`` (one row per output position, Cout columns)."""
    y = np.asarray(y, dtype=np.float64)
    if node.op == "Conv":
        y = np.moveaxis(y, 1, -1)
    return y.reshape(-1, y.shape[-1])[index]


def row_count(node: Layer, x_shape: tuple[int, ...]) -> int:
    """The number of design rows (output positions) of a layer for an input of ``x_shape``."""
    if node.op == "Conv":
        return x_shape[0] * math.prod(conv_geometry(node, x_shape)[4])
    if _transposed_a(node):
        return x_shape[-1]
    return math.prod(x_shape[:-1])


def output_count(node: Layer, y_shape: tuple[int, ...]) -> int:
    """The number of output positions (design rows) of a layer's output of ``y_shape``."""
    return math.prod(y_shape[:1] + y_shape[2:]) if node.op == "Conv" else math.prod(y_shape[:-1])


class _Updatable(Protocol):
    def update(self, x: np.ndarray, /) -> None: ...


class Fanout:
    """Feeds one calibration tensor to every accumulator that reads it, in a fixed order.

    Callers keep references to the accumulators and read them after the run, so a sharded run
    fills *these* objects: each worker gets :meth:`blank` copies (same configuration, no data,
    told where their batches start by :meth:`seek`) and the driver folds the workers' results in
    with :meth:`merge`, accumulator by accumulator, in batch order. That needs every accumulator
    to have ``merge(other)`` and ``blank(memo)``; without them :attr:`mergeable` is False and the
    calibration stays in one process.
    """

    def __init__(self, accumulators: list[Any]) -> None:
        self.accumulators: list[_Updatable] = accumulators

    def update(self, x: np.ndarray) -> None:
        for acc in self.accumulators:
            acc.update(x)

    @property
    def mergeable(self) -> bool:
        return all(shardable(acc) for acc in self.accumulators)

    def blank(self, memo: dict[int, Any]) -> Fanout:
        """A fan-out to empty copies of the accumulators (for a worker)."""
        return Fanout([blank_of(acc, memo) for acc in self.accumulators])

    def seek(self, index: int) -> None:
        """The next batch is batch ``index`` of the whole stream (a worker's chunk starts there)."""
        for acc in self.accumulators:
            seek(acc, index)

    def merge(self, other: Fanout) -> None:
        """Fold a worker's accumulators into these, one by one (same accumulators, same order)."""
        if len(other.accumulators) != len(self.accumulators):
            raise CalibrationError(
                f"cannot merge a fan-out to {len(other.accumulators)} accumulators into one to {len(self.accumulators)}"
            )
        for mine, theirs in zip(self.accumulators, other.accumulators, strict=True):
            mine.merge(theirs)  # type: ignore[attr-defined]  # mergeable says so


def conv_groups(node: Layer) -> int:
    """The ``group`` attribute of a Conv (1 for every other op)."""
    return int(node.attrs.get("group", 1)) if node.op == "Conv" else 1


def seed_of(rng: np.random.Generator) -> int:
    """A seed drawn from a copy of ``rng``: the same for every collector made from the same generator."""
    return int(copy.deepcopy(rng).integers(0, 2**63))


def batch_rows(total: int, max_rows: int | None, seed: int, index: int) -> np.ndarray:
    """Sorted row indices of batch ``index``: all of ``total``, or ``max_rows`` drawn with a
    generator seeded by ``(seed, index)``, so the rows do not depend on which process saw the
    batch or on the batches before it."""
    if max_rows is None or total <= max_rows:
        return np.arange(total)
    return np.sort(np.random.default_rng([seed, index]).choice(total, max_rows, replace=False))


class InputGram:
    """Streaming, mergeable ``X^T X`` of one layer's design matrix (float64).

    The columns are in the order of the weight flattened as the layer's reduction: Conv
    ``W.reshape(Cout, Cin/group*prod(kernel))``, Gemm the K axis of B (``transA`` honoured),
    MatMul the last axis of the input. A grouped (or depthwise) Conv gets one block per group:
    group ``g`` sees input channels ``[g*Cin/group, (g+1)*Cin/group)`` and produces output
    channels ``[g*Cout/group, (g+1)*Cout/group)``; :meth:`blocks` is ``(group, d, d)`` and
    :meth:`hessian` is the ``(d, d)`` matrix of a layer with one group (it raises otherwise).

    ``max_rows`` bounds the design rows taken per batch: a random subset drawn per batch with a
    generator seeded by ``(seed, batch index)`` (``seed`` from ``rng`` when one is given, see
    :func:`seed_of`), so a batch gets the same rows in one process or in a worker that was told
    where its batches start (:meth:`seek`); ``None`` keeps every row. Merging the collectors of
    two halves of the data gives the sums of one pass over all of it, up to the order of the
    float64 additions. A copy sent to a worker carries the layer's :class:`LayerView`, not its
    node (``node`` is None there).
    """

    def __init__(
        self,
        node: ir.Node,
        max_rows: int | None = None,
        seed: int = 0,
        rng: np.random.Generator | None = None,
    ) -> None:
        if node.op not in ("Conv", "Gemm", "MatMul"):
            raise CalibrationError(f"{describe(node)}: InputGram handles Conv, Gemm and MatMul, not {node.op}")
        self.node = node
        self.layer = LayerView.of(node)
        self.max_rows = max_rows
        self.seed = seed_of(rng) if rng is not None else seed
        self.groups = conv_groups(node)
        self.sums: np.ndarray | None = None  # (group, d, d)
        self.rows = 0
        self.batch = 0  # the index (in the whole stream) of the next batch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "node": None}  # the node links the whole graph and its weights

    def blank(self, memo: dict[int, Any] | None = None) -> InputGram:
        """An empty collector of the same layer, rows and seed."""
        fresh = copy.copy(self)
        fresh.sums, fresh.rows, fresh.batch = None, 0, 0
        return fresh

    def seek(self, index: int) -> None:
        self.batch = index

    def update(self, x: np.ndarray) -> None:
        """Add the design rows of one batch of the layer's input."""
        index = batch_rows(row_count(self.layer, np.shape(x)), self.max_rows, self.seed, self.batch)
        self.batch += 1
        a = design_rows(self.layer, x, index)
        g = self.groups
        if g == 1:
            part = (a.T @ a)[None]
        else:
            blocked = a.reshape(len(a), g, -1)
            part = np.einsum("sgi,sgj->gij", blocked, blocked)
        if self.sums is None:
            self.sums = part
        elif self.sums.shape != part.shape:
            raise CalibrationError(
                f"{self.layer.label}: the design width changed between batches ({self.sums.shape[1:]} vs {part.shape[1:]})"
            )
        else:
            self.sums += part
        self.rows += len(a)

    def merge(self, other: InputGram) -> None:
        """Add another collector's statistics (of the same layer, rows and seed) to this one."""
        if (other.layer.label, other.max_rows, other.seed) != (self.layer.label, self.max_rows, self.seed):
            raise CalibrationError(
                f"{self.layer.label}: cannot merge the Gram matrix of {other.layer.label} or other rows"
            )
        if other.sums is None:
            return
        if self.sums is None:
            self.sums = other.sums.copy()
        elif self.sums.shape != other.sums.shape:
            raise CalibrationError(f"{self.layer.label}: cannot merge Gram matrices of different shapes")
        else:
            self.sums += other.sums
        self.rows += other.rows

    def blocks(self) -> np.ndarray:
        """The mean ``X^T X`` per group, ``(group, d, d)`` float64."""
        if self.sums is None or self.rows == 0:
            raise CalibrationError(f"{self.layer.label}: no calibration rows were observed")
        return self.sums / self.rows

    def hessian(self) -> np.ndarray:
        """The mean ``X^T X``, ``(d, d)`` float64 (a layer with one group)."""
        if self.groups != 1:
            raise CalibrationError(f"{self.layer.label} has {self.groups} groups: use blocks() (one per group)")
        return self.blocks()[0]


def dead_columns(h: np.ndarray) -> np.ndarray:
    """The design columns whose input is always zero on the data (``diag H == 0``)."""
    return np.diag(h) == 0


def damped_inverse_cholesky(h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor ``U`` of the damped ``H^-1`` (``H^-1 = U^T U``), float64.

    As GPTQ does: a dead column (``diag H == 0``: its input is always zero, so its weight does not
    matter and callers set it to zero) gets a diagonal of 1, then ``damp * mean(diag H)`` is added
    to the whole diagonal. If the damped matrix is still not positive definite (a rank-deficient
    ``H`` with ``damp=0``), the damping is raised tenfold until it is (at most six times).
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    h = np.array(h, dtype=np.float64, copy=True)
    d = h.shape[0]
    dead = dead_columns(h)
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h))) if d else 1.0
    step = damp * mean
    eye = np.eye(d)
    for attempt in range(7):
        try:
            lower = np.linalg.cholesky(h + step * eye)
            inv_lower = np.linalg.solve(lower, eye)  # L^-1, lower triangular
            inverse = inv_lower.T @ inv_lower  # H^-1
            return np.linalg.cholesky(inverse).T
        except np.linalg.LinAlgError:
            if attempt == 6:
                raise
            step = max(step * 10.0, 1e-8 * max(mean, 1e-30))
    raise AssertionError("unreachable")
