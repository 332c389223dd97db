"""Deterministic truncated SVD and the two factors of a low-rank weight.

A matrix ``W (m, n)`` is factored as ``W ~= F @ G`` with ``F = U_r sqrt(S_r)`` (m, r) and
``G = sqrt(S_r) V_r^T`` (r, n): the singular values are split evenly so both factors have the
same scale (which also suits a later quantization). Singular vectors are defined up to a sign;
:func:`svd` fixes it (the entry of largest magnitude of each left vector is positive, ties to
the first), so the same weight gives the same factors bit for bit on every run.

A conv weight ``(Cout, Cin, kh, kw)`` is viewed as the matrix with rows ``(Cin, kh)`` and
columns ``(Cout, kw)``: ``M[(c, i), (o, j)] = W[o, c, i, j]``. Its factors are the weights of
``Conv(r, Cin, kh, 1)`` then ``Conv(Cout, r, 1, kw)``:
``W1[k, c, i, 0] = F[(c, i), k]`` and ``W2[o, k, 0, j] = G[k, (o, j)]``, and
``sum_k W2[o, k, 0, j] W1[k, c, i, 0] = M[(c, i), (o, j)]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp.blas import single_threaded_blas


@dataclass(frozen=True)
class Svd:
    """``u (m, k)``, ``s (k,)`` descending, ``vt (k, n)`` of a float64 matrix, signs fixed."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(F (m, r), G (r, n)) float64 with ``F @ G`` the best rank-``r`` approximation."""
        root = np.sqrt(self.s[:rank])
        return self.u[:, :rank] * root[None, :], root[:, None] * self.vt[:rank]


def svd(matrix: np.ndarray) -> Svd:
    """Thin SVD in float64 with the sign of each singular pair fixed (see the module docstring)."""
    with single_threaded_blas():
        u, s, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    pivot = np.argmax(np.abs(u), axis=0)
    signs = np.where(u[pivot, np.arange(u.shape[1])] < 0, -1.0, 1.0)
    return Svd(u * signs[None, :], s, vt * signs[:, None])


def conv_matrix(weight: np.ndarray) -> np.ndarray:
    """The ``(Cin*kh, Cout*kw)`` float64 matrix of a ``(Cout, Cin, kh, kw)`` conv weight."""
    cout, cin, kh, kw = weight.shape
    return weight.astype(np.float64).transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)


def conv_factors(first: np.ndarray, second: np.ndarray, weight_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Conv weights ``(r, Cin, kh, 1)`` and ``(Cout, r, 1, kw)`` from the matrix factors F, G."""
    cout, cin, kh, kw = weight_shape
    rank = first.shape[1]
    w1 = first.reshape(cin, kh, rank).transpose(2, 0, 1)[..., None]
    w2 = second.reshape(rank, cout, kw).transpose(1, 0, 2)[:, :, None, :]
    return np.ascontiguousarray(w1), np.ascontiguousarray(w2)
