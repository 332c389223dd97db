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
#: per-token HiF8: s = max|x| / 16 (the emitted subgraph's target)
HIF8_TOKEN_TARGET = 16.0


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

    ``s = max(max|x| over axis / top, tiny)``, integer: ``clip(RNE(x / s), qmin, qmax) * s``; FP8 /
    HiF8: the nearest grid value of ``x / s`` (ties as the codec, saturating) times ``s`` (HiF8's
    top is 16, not its max). Nothing is learned: the
    op order and float32 arithmetic are those of the emitted subgraph, so the export needs no change.
    """

    def __init__(self, dtype: str, axis: int) -> None:
        super().__init__()
        fmt = get_format(dtype)
        if isinstance(fmt, IntegerFormat):
            self.top, self.qmin, self.qmax = float(fmt.qmax), float(fmt.qmin), float(fmt.qmax)
            self.grid: FakeQuant | None = None
        elif isinstance(fmt, ElementFormat):
            # HiF8's emitted subgraph scales the token's max to 16 (quant.activation_subgraphs.emit_hif8_activation:
            # the HiF8 grid is finest there), FP8's to the format's max
            top = HIF8_TOKEN_TARGET if fmt.name == "hif8" else float(fmt.max_value)
            self.top, self.grid = top, FakeQuant(dtype, np.asarray(1.0, np.float32), np.asarray(0))
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


class DynamicTensorFakeQuant(torch.nn.Module):
    """Per-tensor uint8 activations computed at run time: ONNX DynamicQuantizeLinear then DequantizeLinear.

    ``s = (max(0, max x) - min(0, min x)) / 255``, ``zp = saturate(RNE(-min(0, min x) / s))``,
    ``(saturate(RNE(x / s) + zp) - zp) * s`` in float32 (the ONNX definition; ``quant.dynamic``
    writes it, fused by onnxruntime into ConvInteger / DynamicQuantizeMatMul). Nothing is learned.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dtype, self.enabled = "uint8", True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        zero = torch.zeros((), dtype=x.dtype)
        low = torch.minimum(x.detach().min(), zero)
        s = (torch.maximum(x.detach().max(), zero) - low) / 255.0
        if float(s) == 0.0:  # an all-zero tensor: every code is the zero point, the dequantized value 0
            return x * 0.0
        zp = torch.clamp(torch.round(-low / s), 0.0, 255.0)
        # clip before the straight-through rounding: no gradient where the code saturates (never, but for ties)
        q = round_ste(torch.clamp(x / s, -zp, 255.0 - zp))
        return q * s


class MXFakeQuant(torch.nn.Module):
    """MXFP8 (E4M3) activations computed at run time (``quant.activation_subgraphs.emit_mx_activation``).

    Blocks of 32 along ``axis`` (a short last block when the length is no multiple of 32; zero padding
    changes no amax), ``amax`` over a block's finite elements, ``E = min{j : amax <= 1.75 * 2^j}``,
    ``X = clip(E - emax, -127, cap)``, elements ``E4M3(x * 2^-X) * 2^X`` (to even, as the codec).
    Powers of two make every product exact, so the module matches onnxruntime bit for bit.
    """

    def __init__(self, dtype: str, axis: int) -> None:
        super().__init__()
        fmt = get_format(dtype)
        if not isinstance(fmt, MXFormat) or not fmt.element.name.startswith("fp8_e4m3"):
            raise ValueError(f"format {dtype!r} has no MX activation fake quantization (MXFP8 E4M3 only)")
        self.dtype, self.axis, self.enabled = dtype, axis, True
        self.block, self.emax = fmt.block_size, int(fmt.emax_elem)
        self.cap = int(fmt._max_exponent)  # noqa: SLF001 - the codec's float32 overflow cap, as the emitter
        self.grid = FakeQuant(fmt.element.name, np.asarray(1.0, np.float32), np.asarray(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        moved = x.movedim(self.axis, -1)
        k = moved.shape[-1]
        pad = -k % self.block
        padded = torch.nn.functional.pad(moved, (0, pad)) if pad else moved
        blocks = padded.contiguous().reshape(*padded.shape[:-1], -1, self.block)
        detached = blocks.detach()
        finite = torch.where(torch.isfinite(detached), detached, torch.zeros((), dtype=x.dtype))
        u = finite.abs().amax(dim=-1, keepdim=True) / torch.tensor(1.75, dtype=x.dtype)
        mantissa, exponent = torch.frexp(u)  # u = m 2^e, m in [0.5, 1): the least j with u <= 2^j
        exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
        exponent = torch.where(u == 0, torch.full_like(exponent, -127), exponent)
        x_exp = torch.clamp(exponent - self.emax, -127, self.cap)
        one = torch.ones_like(u)
        scale, inverse = torch.ldexp(one, x_exp), torch.ldexp(one, -x_exp)
        y = blocks * inverse
        out = (self.grid.nearest(y.detach()) + (y - y.detach())) * scale
        out = out.reshape(padded.shape)
        if pad:
            out = out[..., :k]
        return out.movedim(-1, self.axis)


#: the quantizers of activations computed at run time (nothing learned)
RUN_TIME_QUANTIZERS = (TokenFakeQuant, MXFakeQuant, DynamicTensorFakeQuant)


def run_time_quantizer(dtype: str, granularity: str, axis: int) -> torch.nn.Module | None:
    """The module of a run-time activation (``granularity`` of ``quantize``'s record), None for an unknown kind.

    ``axis`` is the node's reduction axis (channels for Conv): the per-token and MX blocks run along it.
    """
    if granularity == "dynamic":  # DynamicQuantizeLinear: one uint8 scale per tensor
        return DynamicTensorFakeQuant()
    if granularity != "token":
        return None
    fmt = get_format(dtype)
    if isinstance(fmt, MXFormat) and fmt.element.name.startswith("fp8_e4m3"):
        return MXFakeQuant(dtype, axis)
    if isinstance(fmt, IntegerFormat) or dtype.startswith("fp8") or dtype == "hif8":
        return TokenFakeQuant(dtype, axis)
    return None
