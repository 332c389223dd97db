"""Fake quantization in torch: the Q/DQ arithmetic of onnxruntime, with straight-through gradients.

Integer grids compute exactly what QuantizeLinear -> DequantizeLinear computes
(``clip(RNE(x / s) + zp, qmin, qmax) - zp) * s`` in float32: torch.round is round-half-to-even
like ONNX), so a fake-quantized module matches the exported model bit for bit. The scale is an
trained with LSQ's gradient (as a log-gain on the PTQ scale) (Esser et al. 2020: the straight-through estimator
for the rounding, the scale's gradient scaled by ``1 / sqrt(N * qmax)``, N the values sharing
the scale). Element float grids (FP8, FP4, MX elements, HiF8) round to the nearest value of the
codec's table, ties as the codec breaks them: to the even code (FP8, FP4: every other magnitude of
the sorted table has an even code) or away from zero (HiF8); beyond the table they saturate. Such a
grid may be given in stored-code units (FP4 stored as INT8 ``2 * v`` under the scale ``s / 2``).
"""

from __future__ import annotations

import math

import numpy as np

from onnxcomp.formats import ElementFormat, IntegerFormat, MXFormat, get_format
from onnxcomp.qat.engine import torch

_TINY = float(np.finfo(np.float32).tiny)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, its gradient multiplied by ``factor`` backward (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


class FakeQuant(torch.nn.Module):
    """One quantized tensor's Q/DQ with a learnable scale (per tensor, per channel or per group)."""

    zero_point: torch.Tensor
    initial_scale: torch.Tensor
    magnitudes: torch.Tensor
    midpoints: torch.Tensor

    def __init__(
        self,
        dtype: str,
        scale: np.ndarray,
        zero_point: np.ndarray,
        axis: int | None = None,
        block_size: int = 0,
        values_per_scale: int = 1,
        grid: np.ndarray | None = None,
        learn_scale: bool = True,
    ) -> None:
        super().__init__()
        fmt = get_format(dtype)
        fmt = fmt.element if isinstance(fmt, MXFormat) else fmt  # MX: the element grid under fixed block scales
        if not isinstance(fmt, (IntegerFormat, ElementFormat)):
            raise ValueError(f"format {dtype!r} has no element grid to fake-quantize")
        self.dtype = dtype
        self.integer = isinstance(fmt, IntegerFormat)
        # the scale is ``initial * exp(log_gain)``: positive whatever the step, an optimizer step changes it
        # relatively (Adam's step is ~lr whatever the gradient's size), and exp(0) = 1 keeps the PTQ
        # scale to the bit until training moves it
        self.register_buffer("initial_scale", torch.from_numpy(np.array(scale, np.float32)))
        self.log_gain = torch.nn.Parameter(torch.zeros_like(self.initial_scale), requires_grad=learn_scale)
        self.register_buffer("zero_point", torch.from_numpy(np.asarray(zero_point).astype(np.float32)))
        self.axis, self.block_size = axis, block_size
        if isinstance(fmt, IntegerFormat):
            self.qmin, self.qmax = float(fmt.qmin), float(fmt.qmax)
            top = max(abs(self.qmin), self.qmax)
        else:
            values = np.unique(fmt.values[np.isfinite(fmt.values)]) if grid is None else np.asarray(grid)
            magnitudes = np.unique(np.abs(values.astype(np.float64)))  # symmetric tables: 0 first
            self.register_buffer("magnitudes", torch.from_numpy(magnitudes.astype(np.float32)))
            midpoints = ((magnitudes[1:] + magnitudes[:-1]) / 2).astype(np.float32)  # exact: few significant bits
            self.register_buffer("midpoints", torch.from_numpy(midpoints))
            self.ties_away = fmt.name == "hif8"
            top = float(magnitudes.max())
        self.gradient_factor = 1.0 / math.sqrt(max(1, values_per_scale) * top)
        self.enabled = True

    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-unit parameter (scale, zero point) laid out to broadcast against ``x``."""
        if t.dim() == 0 or self.axis is None:
            return t
        axis = self.axis % x.dim()
        if self.block_size:  # blocked: same rank as x, blocks along ``axis``
            return t.repeat_interleave(self.block_size, dim=axis).narrow(axis, 0, x.shape[axis])
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.reshape(shape)

    @property
    def scale(self) -> torch.Tensor:
        """The current scale (float32, the shape of the exported scale initializer)."""
        return (self.initial_scale * torch.exp(self.log_gain)).clamp_min(_TINY)

    def effective_scale(self, x: torch.Tensor) -> torch.Tensor:
        """:attr:`scale` to the bit (what the export writes), with LSQ's scaled gradient, laid out against ``x``.

        The gradient-scaled path alone, ``(g - g f) + g f``, can land one ulp off ``exp(g)``: a
        weight then rounds to another code in training than in the exported file.
        """
        gain = grad_scale(self.log_gain, self.gradient_factor)
        scaled = (self.initial_scale * torch.exp(gain)).clamp_min(_TINY)
        return self._broadcast(self.scale.detach() + (scaled - scaled.detach()), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.effective_scale(x)
        v = x / s
        if self.integer:
            zp = self._broadcast(self.zero_point, x)
            # clip, then round (LSQ's order; the same values as ONNX's round-then-saturate for integer bounds)
            q = round_ste(torch.clamp(v, self.qmin - zp, self.qmax - zp))
            return q * s
        # the grid value exactly (x - x.detach() is 0), straight-through gradient; v + (nearest - v) would
        # lose the value to rounding where |v| is far beyond the grid (saturation)
        inside = torch.clamp(v, -self.magnitudes[-1], self.magnitudes[-1])  # no gradient past saturation
        return (self.nearest(v.detach()) + (inside - inside.detach())) * s

    def nearest(self, v: torch.Tensor) -> torch.Tensor:
        """The grid value nearest to ``v`` (element float grids), ties and saturation as the codec."""
        a = v.abs()
        index = torch.bucketize(a, self.midpoints)  # a == midpoints[i] gives i: the smaller magnitude
        tie = index < self.midpoints.numel()
        tie = tie & (a == self.midpoints[index.clamp_max(self.midpoints.numel() - 1)])
        up = tie if self.ties_away else tie & (index % 2 == 1)  # to the even code: the even magnitude index
        return torch.sign(v) * self.magnitudes[index + up.long()]


class TokenFakeQuant(torch.nn.Module):
    """Per-token activation quantization computed at run time (``quant.emit.emit_dynamic_per_token``).

    ``s = max(max|x| over axis / top, tiny)``, integer: ``clip(RNE(x / s), qmin, qmax) * s``; FP8:
    the nearest FP8 value of ``x / s`` (to even, saturating) times ``s``. Nothing is learned: the
    op order and float32 arithmetic are those of the emitted subgraph, so the export needs no change.
    """

    def __init__(self, dtype: str, axis: int) -> None:
        super().__init__()
        fmt = get_format(dtype)
        if isinstance(fmt, IntegerFormat):
            self.top, self.qmin, self.qmax = float(fmt.qmax), float(fmt.qmin), float(fmt.qmax)
            self.grid: FakeQuant | None = None
        elif isinstance(fmt, ElementFormat):
            self.top, self.grid = float(fmt.max_value), FakeQuant(dtype, np.asarray(1.0, np.float32), np.asarray(0))
        else:
            raise ValueError(f"format {dtype!r} has no per-token fake quantization")
        self.dtype, self.axis, self.enabled = dtype, axis, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        amax = x.abs().amax(dim=self.axis, keepdim=True)
        s = torch.clamp_min(amax / torch.tensor(self.top, dtype=x.dtype), _TINY)
        v = x / s
        if self.grid is None:
            return torch.clamp(round_ste(v), self.qmin, self.qmax) * s
        return (self.grid.nearest(v.detach()) + (v - v.detach())) * s
