"""Data-aware refinement: refit the second factor by least squares on calibration activations.

For each decomposed node a :class:`Probe` says which tensors to fetch per batch and how to turn
them into rows of a linear problem ``A X ~= Y``: ``A`` is the first factor's output arranged
like the second factor's input (plus a column of ones when the bias is refit), ``Y`` the
original node's output. Only the normal equations ``A^T A``, ``A^T Y`` and ``sum(Y**2)`` are
kept (float64, rows streamed in chunks), so memory does not grow with the number of batches.
All probes share one onnxruntime session through :class:`onnxcomp.quant.calibrator.Calibrator`;
a conv probe adds its first factor as a side branch of the model so its output can be fetched.

The solve is ridge-regularised towards the SVD factor ``X0``:
``(A^T A + lam I) X = A^T Y + lam X0`` with ``lam = damping * mean(diag(A^T A))``, so a layer
with little data keeps (nearly) its SVD factors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxcomp.blas import single_threaded_blas
from onnxcomp.calibration.collect import Calibrator
from onnxcomp.calibration.shard import blank_of
from onnxcomp.decomposition.geometry import ConvGeometry
from onnxcomp.errors import CalibrationError

_CHUNK_ROWS = 1 << 15

#: ``rows(arrays)`` yields ``(A, Y)`` chunks (float arrays, same number of rows) for one batch.
RowsFn = Callable[[list[np.ndarray]], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass
class Probe:
    """What one decomposed node needs from each calibration batch (see the module docstring)."""

    tensors: tuple[str, ...]
    rows: RowsFn
    prior: np.ndarray  # (p, q) float64: the SVD solution, intercept row last when ``intercept``
    intercept: bool
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)


class NormalEquations:
    """Streaming ``A^T A``, ``A^T Y`` and ``sum(Y**2)`` of a least-squares problem (float64)."""

    def __init__(self, columns: int, outputs: int, intercept: bool) -> None:
        p = columns + int(intercept)
        self.intercept = intercept
        self.gram = np.zeros((p, p))
        self.cross = np.zeros((p, outputs))
        self.energy = 0.0
        self.rows = 0

    def add(self, a: np.ndarray, y: np.ndarray) -> None:
        for start in range(0, a.shape[0], _CHUNK_ROWS):
            a64 = a[start : start + _CHUNK_ROWS].astype(np.float64)
            y64 = y[start : start + _CHUNK_ROWS].astype(np.float64)
            if self.intercept:
                a64 = np.concatenate([a64, np.ones((a64.shape[0], 1))], axis=1)
            self.gram += a64.T @ a64
            self.cross += a64.T @ y64
            self.energy += float(np.sum(y64 * y64))
            self.rows += a64.shape[0]

    def merge(self, other: NormalEquations) -> None:
        """Add the sums of another part of the data (same problem)."""
        if other.gram.shape != self.gram.shape or other.cross.shape != self.cross.shape:
            raise CalibrationError("refit: cannot merge normal equations of different shapes")
        self.gram += other.gram
        self.cross += other.cross
        self.energy += other.energy
        self.rows += other.rows

    def residual(self, x: np.ndarray) -> float:
        """``||A X - Y||^2 / ||Y||^2`` from the accumulated sums."""
        err = float(np.sum(x * (self.gram @ x)) - 2.0 * np.sum(x * self.cross)) + self.energy
        return max(err, 0.0) / self.energy if self.energy > 0 else 0.0

    def solve(self, prior: np.ndarray, damping: float) -> np.ndarray:
        diag = np.diag(self.gram)
        lam = damping * float(diag.mean()) if diag.size and diag.mean() > 0 else damping
        lhs = self.gram + lam * np.eye(self.gram.shape[0])
        rhs = self.cross + lam * prior
        try:
            return np.linalg.solve(lhs, rhs)
        except np.linalg.LinAlgError:
            return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


class _Joint:
    """Collects one batch's tensors of a probe; feeds the normal equations once all arrived.

    Mergeable for sharded calibration: a worker fills a :meth:`blank` copy (it carries the
    tensors and the ``rows`` function, not the probe's prior or side-branch nodes) and the driver
    adds its sums with :meth:`merge`.
    """

    def __init__(self, probe: Probe) -> None:
        self.probe: Probe | None = probe  # None in a copy sent to a worker
        self.tensors = probe.tensors
        self.rows = probe.rows
        self.pending: dict[str, np.ndarray] = {}
        q = probe.prior.shape[1]
        self.equations = NormalEquations(probe.prior.shape[0] - int(probe.intercept), q, probe.intercept)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "probe": None}

    def put(self, name: str, value: np.ndarray) -> None:
        self.pending[name] = value
        if len(self.pending) == len(self.tensors):
            arrays = [self.pending[n] for n in self.tensors]
            self.pending = {}
            for a, y in self.rows(arrays):
                self.equations.add(a, y)

    def blank(self, memo: dict[int, Any] | None = None) -> _Joint:
        fresh = copy.copy(self)
        fresh.pending = {}
        eq = self.equations
        fresh.equations = NormalEquations(eq.gram.shape[0] - int(eq.intercept), eq.cross.shape[1], eq.intercept)
        return fresh

    def merge(self, other: _Joint) -> None:
        self.equations.merge(other.equations)


class _Fanout:
    """The calibrator's observer of one tensor: hands each batch's value to every probe using it.

    A probe reading several tensors is in the fan-out of each; merging a worker's copies adds its
    sums once, through the fan-out of the probe's last tensor.
    """

    def __init__(self, name: str, joints: list[_Joint]) -> None:
        self.name = name
        self.joints = joints

    def update(self, value: np.ndarray) -> None:
        for joint in self.joints:
            joint.put(self.name, value)

    mergeable = True

    def blank(self, memo: dict[int, Any]) -> _Fanout:
        return _Fanout(self.name, [blank_of(joint, memo) for joint in self.joints])

    def merge(self, other: _Fanout) -> None:
        for mine, theirs in zip(self.joints, other.joints, strict=True):
            if mine.tensors[-1] == self.name:
                mine.merge(theirs)


@dataclass(frozen=True)
class MatMulRows:
    """Rows of a MatMul/Gemm probe: ``x @ first`` against the original ``x @ matrix`` (picklable)."""

    first: np.ndarray  # (K, r) float64
    matrix: np.ndarray  # (K, N)
    trans_a: bool  # Gemm transA: the input is (K, M)

    def __call__(self, arrays: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        x = arrays[0].T if self.trans_a else arrays[0].reshape(-1, self.matrix.shape[0])
        x = x.astype(np.float64)
        yield x @ self.first, x @ self.matrix


@dataclass(frozen=True)
class ConvRows:
    """Rows of a Conv probe from the first factor's output and the original output (picklable)."""

    geometry: ConvGeometry
    kernel: int  # the second factor's kernel width

    def __call__(self, arrays: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        z, out = arrays
        g = self.geometry
        return conv_rows(z, out, self.kernel, g.strides[1], g.dilations[1], g.axis_pads(1, z.shape[3]))


@dataclass
class RefitResult:
    """The refit solution of one probe and how well each solution fits the calibration data."""

    solution: np.ndarray
    rows: int
    error_svd: float  # relative squared output error of the SVD factors
    error_refit: float  # the same after the refit


def probe_model(model: onnx.ModelProto, probes: Iterable[Probe]) -> onnx.ModelProto:
    """A copy of ``model`` with every probe's side-branch nodes and initializers added."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    for probe in probes:
        augmented.graph.node.extend(probe.nodes)
        augmented.graph.initializer.extend(probe.initializers)
    return augmented


def refit(
    model: onnx.ModelProto,
    probes: list[Probe],
    batches: Iterable[Mapping[str, np.ndarray]],
    damping: float,
    max_batches: int | None = None,
    progress: bool = False,
) -> list[RefitResult]:
    """Stream ``batches`` once through ``model`` (plus probe side branches); solve every probe."""
    joints = [_Joint(p) for p in probes]
    users: dict[str, list[_Joint]] = {}
    for joint in joints:
        for name in joint.tensors:
            users.setdefault(name, []).append(joint)
    fanouts = {name: _Fanout(name, js) for name, js in users.items()}
    factories: dict[str, Any] = {name: (lambda o=fanout: o) for name, fanout in fanouts.items()}
    with single_threaded_blas():
        Calibrator(probe_model(model, probes), factories).run(batches, max_batches=max_batches, progress=progress)
    results = []
    for joint, probe in zip(joints, probes, strict=True):
        eq, prior = joint.equations, probe.prior
        if eq.rows == 0:
            raise CalibrationError(f"refit: no rows collected for tensor {probe.tensors[-1]!r}")
        with single_threaded_blas():
            solution = eq.solve(prior, damping)
        if not np.isfinite(solution).all():
            solution = prior
        results.append(RefitResult(solution, eq.rows, eq.residual(prior), eq.residual(solution)))
    return results


def conv_rows(
    z: np.ndarray, y: np.ndarray, kernel: int, stride: int, dilation: int, pads: tuple[int, int]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows of a ``1 x kernel`` conv along the last axis: ``z (N, r, Ho, W)``, ``y (N, C, Ho, Wo)``.

    Columns are ordered ``(k, j)`` (input channel, kernel tap), matching weight ``[o, k, 0, j]``.
    """
    n, rank, ho, _ = z.shape
    wo = y.shape[3]
    span = stride * (wo - 1) + 1
    for i in range(n):
        zp = np.pad(z[i], ((0, 0), (0, 0), pads))
        taps = [zp[:, :, j * dilation : j * dilation + span : stride] for j in range(kernel)]
        design = np.stack(taps, axis=1).reshape(rank * kernel, ho * wo).T
        yield design, y[i].reshape(y.shape[1], ho * wo).T
