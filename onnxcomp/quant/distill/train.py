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
from onnxcomp.quant.distill.block import Tail, backward, backward_input, forward
from onnxcomp.quant.distill.clip import InputQuantizer
from onnxcomp.quant.distill.grid import GridWeight, rect_sigmoid, reduce
from onnxcomp.quant.distill.rows import Layer, RowSource

#: Largest number of output rows the before/after error is measured on (a fixed random subset).
EVAL_ROWS = 8192
WARMUP = 0.2  # fraction of the iterations before the rounding regularizer starts
BETA_START, BETA_END = 20.0, 2.0
GAIN_LR = 0.05  # the input range's log-gain step, relative to ``lr`` (one number per block: small steps)


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
    learn_ranges: bool = False  # the input quantizer's clipping range (LSQ-style gain on its scale)
    balance_channels: bool = True  # weight each output channel's error by 1 / its teacher energy (docs/distill.md)


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
    log_gain: float = 0.0  # learned gain of the input quantizer's range (0: the calibrated range)


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
    input_quant: InputQuantizer | None = None,
    log_gain: float = 0.0,
) -> float:
    """Relative MSE of the block output on the rows ``index`` (chunked), through ``input_quant`` when given."""
    matrix = layer.to_matrix(w.astype(np.float32))
    num = den = 0.0
    for start in range(0, len(index), 4096):
        part = index[start : start + 4096]
        rows = source.rows(part).astype(np.float32, copy=False)
        if input_quant is not None:
            rows = input_quant.fake(rows, log_gain)
        y, _ = forward(rows, matrix, bias, tails)
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
    channel_weights: np.ndarray | None = None,
    input_slopes: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, float]:
    """(loss, its gradients w.r.t. the rounding variables, the log-scales, the bias and the input gain).

    ``rows`` are the (already fake-quantized) inputs; ``input_slopes`` their (d x'/d x, d x'/d
    log_gain) when the input range is learned. ``channel_weights`` (mean 1) weight each output
    channel's squared error.
    """
    w, dw_dv, q, s_e = gw.soft(v, log_scale)
    matrix = layer.to_matrix(w)
    y, slopes = forward(rows, matrix, bias, tails)
    diff = y - target
    weighted = diff if channel_weights is None else diff * channel_weights.astype(diff.dtype)
    loss = float(np.mean(diff * weighted, dtype=np.float64)) / norm
    grad_out = 2.0 * weighted / (diff.size * norm)
    grad_matrix, grad_bias = backward(grad_out, rows, slopes, layer.group)
    grad_w = layer.from_matrix(grad_matrix)
    grad_log = reduce(grad_w * q * s_e, gw.qw, np.shape(log_scale))
    grad_gain = 0.0
    if input_slopes is not None:
        grad_rows = backward_input(grad_out, slopes, matrix.astype(np.float32))
        grad_gain = float(np.sum(grad_rows * input_slopes[1], dtype=np.float64))
    return loss, grad_w * dw_dv, grad_log, grad_bias, grad_gain


def channel_weights_of(target_rows: np.ndarray) -> np.ndarray:
    """Per-channel loss weights (mean 1): the inverse of each channel's teacher energy, floored at 1/100 of the mean.

    Without it a block's loss is dominated by its loudest channels; with it each channel's
    relative error counts alike (quiet channels feed later layers too).
    """
    energy = np.mean(target_rows.astype(np.float64) ** 2, axis=0)
    inverse = 1.0 / np.maximum(energy, 0.01 * max(float(energy.mean()), 1e-30))
    return inverse / inverse.mean()


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
    input_quant: InputQuantizer | None = None,
) -> Learned:
    """Distill one block on the stored (student input, teacher output) pair.

    A pure function of its arguments (and ``rng``'s state). ``input_quant``: the block's input
    quantizer, applied to the stored float input on the fly (its range learned when
    ``input_quant.learn``); None when ``source`` already holds the quantized input.
    """
    # small matrices: OpenBLAS's spinning threads made each step 30x slower on a loaded machine
    with single_threaded_blas():
        return _learn_block(source, target, layer, gw, bias0, tails, settings, rng, progress, input_quant)


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
    input_quant: InputQuantizer | None,
) -> Learned:
    rtn_codes = gw.rtn
    if not settings.learn_rounding:
        gw = replace(gw, low=rtn_codes, high=rtn_codes, frac=np.zeros_like(rtn_codes))
    eval_index = np.sort(rng.choice(source.count, min(source.count, EVAL_ROWS), replace=False))
    zero_scale = np.zeros(np.shape(gw.scale0))
    rtn_w = gw.dequantize(rtn_codes, zero_scale)
    before = block_error(source, target, layer, rtn_w, bias0, tails, eval_index, input_quant)
    eval_targets = source.targets(target, eval_index)
    norm = max(float(np.mean(eval_targets.astype(np.float64) ** 2)), 1e-30)
    weights = channel_weights_of(eval_targets) if settings.balance_channels else None

    v = gw.initial_v().astype(np.float64)
    log_scale = zero_scale.copy()
    log_gain = 0.0
    learn_gain = input_quant is not None and input_quant.learn
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
        slopes = None
        if input_quant is not None and learn_gain:
            rows, d_x, d_gain = input_quant.fake_and_grads(rows, log_gain)
            slopes = (d_x, d_gain)
        elif input_quant is not None:
            rows = input_quant.fake(rows)
        t = source.targets(target, index).astype(np.float32, copy=False)
        loss, grad_v, grad_log, grad_bias, grad_gain = loss_and_grads(
            gw, v, log_scale, bias, rows, t, layer, tails, norm, weights, slopes
        )
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
        if learn_gain:
            log_gain = float(adam.step("g", np.array(log_gain), np.array(grad_gain), settings.lr * GAIN_LR))
        if progress is not None:
            progress(it, loss)
    h, _ = rect_sigmoid(v)
    soft_left = int(((h > 0) & (h < 1) & learnable).sum())
    codes = gw.hard_codes(v) if settings.learn_rounding else rtn_codes
    deployed_w = gw.dequantize(codes, log_scale)
    bias_out = None if bias is None else bias.astype(np.float32)
    after = block_error(source, target, layer, deployed_w, bias_out, tails, eval_index, input_quant, log_gain)
    if after > before:  # never deploy a block worse than round-to-nearest on its own data
        return Learned(rtn_codes, zero_scale, bias0, before, before, "rtn", soft_left)
    return Learned(codes, log_scale, bias_out, before, after, "distilled", soft_left, log_gain)
