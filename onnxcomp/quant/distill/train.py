"""Learning one block: AdaRound-style rounding, LSQ-style log-scales and the bias, with Adam.

Loss = MSE(block output, teacher output) / mean(teacher output^2) + ``round_weight`` x the
rounding regularizer mean(1 - |2h - 1|^beta), beta annealed from 20 to 2 after a warm-up (the
regularizer pushes every soft choice to 0 or 1; the final choice is then hard). The learned
numbers are kept only if the hard-rounded block is no worse than round-to-nearest on the
evaluation rows (so distillation never makes a layer worse on its own data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from onnxcomp.blas import single_threaded_blas
from onnxcomp.quant.distill.block import Tail, backward, forward
from onnxcomp.quant.distill.grid import GridWeight, rect_sigmoid, reduce
from onnxcomp.quant.distill.rows import Layer, RowSource

#: Largest number of output rows the before/after error is measured on (a fixed random subset).
EVAL_ROWS = 8192
WARMUP = 0.2  # fraction of the iterations before the rounding regularizer starts
BETA_START, BETA_END = 20.0, 2.0


@dataclass(frozen=True)
class Settings:
    """What is learned and how (the ``distill`` pass options)."""

    iters: int = 300
    lr: float = 0.1  # Adam step of the rounding variables (scales and bias use scaled steps)
    batch_rows: int = 1024  # output rows per step
    round_weight: float = 1.0
    learn_rounding: bool = True
    learn_scales: bool = True
    learn_bias: bool = True


@dataclass
class Learned:
    """A block's result: the codes (code units), log-scales and bias to deploy, and the errors."""

    codes: np.ndarray
    log_scale: np.ndarray
    bias: np.ndarray | None
    error_before: float  # relative MSE of the round-to-nearest block output
    error_after: float  # of the deployed one (== before when RTN was kept)
    kept: str  # "distilled" or "rtn"
    soft_left: int  # rounding variables not yet hard when learning stopped (then rounded at 1/2)


class _Adam:
    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, name: str, param: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
        m = self.m.setdefault(name, np.zeros_like(grad))
        v = self.v.setdefault(name, np.zeros_like(grad))
        m *= self.b1
        m += (1 - self.b1) * grad
        v *= self.b2
        v += (1 - self.b2) * grad * grad
        mh = m / (1 - self.b1**self.t)
        vh = v / (1 - self.b2**self.t)
        return param - lr * mh / (np.sqrt(vh) + self.eps)


def block_error(
    source: RowSource,
    target: np.ndarray,
    layer: Layer,
    w: np.ndarray,
    bias: np.ndarray | None,
    tails: list[Tail],
    index: np.ndarray,
) -> float:
    """Relative MSE of the block output on the rows ``index`` (chunked)."""
    matrix = layer.to_matrix(w.astype(np.float32))
    num = den = 0.0
    for start in range(0, len(index), 4096):
        part = index[start : start + 4096]
        y, _ = forward(source.rows(part).astype(np.float32, copy=False), matrix, bias, tails)
        t = source.targets(target, part).astype(np.float32, copy=False)
        num += float(((y - t) ** 2).sum(dtype=np.float64))
        den += float((t**2).sum(dtype=np.float64))
    return num / max(den, 1e-30)


def loss_and_grads(
    gw: GridWeight,
    v: np.ndarray,
    log_scale: np.ndarray,
    bias: np.ndarray | None,
    rows: np.ndarray,
    target: np.ndarray,
    layer: Layer,
    tails: list[Tail],
    norm: float,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(reconstruction loss, its gradients w.r.t. the rounding variables, the log-scales and the bias)."""
    w, dw_dv, q, s_e = gw.soft(v, log_scale)
    y, slopes = forward(rows, layer.to_matrix(w), bias, tails)
    diff = y - target
    loss = float(np.mean(diff * diff, dtype=np.float64)) / norm
    grad_matrix, grad_bias = backward(2.0 * diff / (diff.size * norm), rows, slopes, layer.group)
    grad_w = layer.from_matrix(grad_matrix)
    grad_log = reduce(grad_w * q * s_e, gw.qw, np.shape(log_scale))
    return loss, grad_w * dw_dv, grad_log, grad_bias


def learn_block(
    source: RowSource,
    target: np.ndarray,
    layer: Layer,
    gw: GridWeight,
    bias0: np.ndarray | None,
    tails: list[Tail],
    settings: Settings,
    rng: np.random.Generator,
    progress: Callable[[int, float], Any] | None = None,
) -> Learned:
    """Distill one block on the stored (student input, teacher output) pair."""
    # small matrices: OpenBLAS's spinning threads made each step 30x slower on a loaded machine
    with single_threaded_blas():
        return _learn_block(source, target, layer, gw, bias0, tails, settings, rng, progress)


def _learn_block(
    source: RowSource,
    target: np.ndarray,
    layer: Layer,
    gw: GridWeight,
    bias0: np.ndarray | None,
    tails: list[Tail],
    settings: Settings,
    rng: np.random.Generator,
    progress: Callable[[int, float], Any] | None,
) -> Learned:
    rtn_codes = gw.rtn
    if not settings.learn_rounding:
        gw = replace(gw, low=rtn_codes, high=rtn_codes, frac=np.zeros_like(rtn_codes))
    eval_index = np.sort(rng.choice(source.count, min(source.count, EVAL_ROWS), replace=False))
    zero_scale = np.zeros(np.shape(gw.scale0))
    rtn_w = gw.dequantize(rtn_codes, zero_scale)
    before = block_error(source, target, layer, rtn_w, bias0, tails, eval_index)
    norm = max(float(np.mean(source.targets(target, eval_index).astype(np.float64) ** 2)), 1e-30)

    v = gw.initial_v().astype(np.float64)
    log_scale = zero_scale.copy()
    bias = None if bias0 is None else bias0.astype(np.float64).copy()
    learnable = gw.high > gw.low
    n_learnable = max(int(learnable.sum()), 1)
    learn_scale = settings.learn_scales and gw.learn_scale
    learn_bias = settings.learn_bias and bias is not None
    adam = _Adam(settings.lr)
    bias_lr = settings.lr * 0.1 * np.sqrt(norm)
    warm = int(settings.iters * WARMUP)
    for it in range(settings.iters):
        adam.t = it + 1
        index = rng.integers(0, source.count, size=min(settings.batch_rows, source.count))
        rows = source.rows(index).astype(np.float32, copy=False)
        t = source.targets(target, index).astype(np.float32, copy=False)
        loss, grad_v, grad_log, grad_bias = loss_and_grads(gw, v, log_scale, bias, rows, t, layer, tails, norm)
        if settings.learn_rounding:
            if it >= warm:
                beta = BETA_START + (BETA_END - BETA_START) * (it - warm) / max(settings.iters - warm - 1, 1)
                h, dh = rect_sigmoid(v)
                u = 2.0 * h - 1.0
                reg_grad = -settings.round_weight / n_learnable * beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2.0
                grad_v = grad_v + np.where(learnable, reg_grad * dh, 0.0)
            v = adam.step("v", v, grad_v, settings.lr)
        if learn_scale:
            log_scale = adam.step("s", log_scale, grad_log, settings.lr * 0.1)
        if learn_bias and bias is not None:
            bias = adam.step("b", bias, grad_bias, bias_lr)
        if progress is not None:
            progress(it, loss)
    h, _ = rect_sigmoid(v)
    soft_left = int(((h > 0) & (h < 1) & learnable).sum())
    codes = gw.hard_codes(v) if settings.learn_rounding else rtn_codes
    deployed_w = gw.dequantize(codes, log_scale)
    bias_out = None if bias is None else bias.astype(np.float32)
    after = block_error(source, target, layer, deployed_w, bias_out, tails, eval_index)
    if after > before:  # never deploy a block worse than round-to-nearest on its own data
        return Learned(rtn_codes, zero_scale, bias0, before, before, "rtn", soft_left)
    return Learned(codes, log_scale, bias_out, before, after, "distilled", soft_left)
