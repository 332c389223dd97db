"""2-D convolution geometry: attributes, per-axis factor attributes, output sizes and MACs.

A ``kh x kw`` conv split into ``kh x 1`` then ``1 x kw`` keeps each spatial axis's stride, padding
and dilation on the factor that convolves along it; the other axis gets stride 1, no padding,
dilation 1 (a ``1``-wide kernel with no padding is the identity along that axis). Zero padding
along ``w`` commutes with the bias-free ``kh x 1`` conv, so padding ``w`` after it is exact.
``auto_pad`` SAME_UPPER / SAME_LOWER / VALID is kept as is on both factors: the padding it
implies along an axis depends only on that axis's size, kernel, stride and dilation, and a
``1``-wide kernel with stride 1 gets none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from onnxcomp import ir

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    value = node.attrs.get(name)
    return [int(v) for v in value] if value is not None else list(default)


@dataclass(frozen=True)
class ConvGeometry:
    """The attributes of a 2-D Conv: ``kernel (kh, kw)``, ``pads (hb, wb, he, we)``, etc."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]
    auto_pad: str
    group: int

    @classmethod
    def of(cls, node: ir.Node, weight_shape: tuple[int, ...]) -> ConvGeometry | str:
        """The geometry of a Conv with a 4-D weight, or why its attributes are unusable."""
        kernel = _ints(node, "kernel_shape", list(weight_shape[2:]))
        strides = _ints(node, "strides", [1, 1])
        dilations = _ints(node, "dilations", [1, 1])
        pads = _ints(node, "pads", [0, 0, 0, 0])
        raw = node.attrs.get("auto_pad", "NOTSET")
        auto_pad = raw.decode() if isinstance(raw, bytes) else str(raw)
        if auto_pad not in AUTO_PADS:
            return f"its auto_pad {auto_pad!r} is not one of {', '.join(AUTO_PADS)}"
        if tuple(kernel) != tuple(weight_shape[2:]):
            return f"its kernel_shape {kernel} does not match its weight {list(weight_shape)}"
        if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
            return "its strides/dilations/pads are not 2-D"
        if min(strides) < 1 or min(dilations) < 1 or min(pads) < 0:
            return "its strides, dilations or pads are out of range"
        return cls(
            (kernel[0], kernel[1]),
            (strides[0], strides[1]),
            (dilations[0], dilations[1]),
            (pads[0], pads[1], pads[2], pads[3]),
            auto_pad,
            int(node.attrs.get("group", 1)),
        )

    def axis_attrs(self, axis: int) -> dict[str, Any]:
        """Attributes of the factor convolving along spatial ``axis`` (0 = h, 1 = w) only."""
        kernel = [1, 1]
        strides = [1, 1]
        dilations = [1, 1]
        kernel[axis], strides[axis], dilations[axis] = self.kernel[axis], self.strides[axis], self.dilations[axis]
        attrs: dict[str, Any] = {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "group": 1}
        if self.auto_pad == "NOTSET":
            pads = [0, 0, 0, 0]
            pads[axis], pads[axis + 2] = self.pads[axis], self.pads[axis + 2]
            attrs["pads"] = pads
        else:
            attrs["auto_pad"] = self.auto_pad
        return attrs

    def axis_pads(self, axis: int, size: int) -> tuple[int, int]:
        """(begin, end) padding along ``axis`` for an input of ``size`` (resolves auto_pad)."""
        k, s, d = self.kernel[axis], self.strides[axis], self.dilations[axis]
        if self.auto_pad == "VALID":
            return 0, 0
        if self.auto_pad == "NOTSET":
            return self.pads[axis], self.pads[axis + 2]
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        return (small, large) if self.auto_pad == "SAME_UPPER" else (large, small)

    def out_size(self, axis: int, size: int) -> int:
        """Output size along ``axis`` for an input of ``size``."""
        begin, end = self.axis_pads(axis, size)
        k, s, d = self.kernel[axis], self.strides[axis], self.dilations[axis]
        return (size + begin + end - d * (k - 1) - 1) // s + 1


def _static(dims: Any) -> list[int] | None:
    if dims is None or any(not isinstance(d, int) or d < 0 for d in dims):
        return None
    return [int(d) for d in dims]


def conv_spatial(node: ir.Node, geometry: ConvGeometry) -> tuple[int, int, int, int] | None:
    """(H, W, Ho, Wo) of a Conv from its input's known shape (None when unknown)."""
    shape = node.inputs[0].shape
    if shape is None or len(shape) != 4:
        return None
    hw = _static(shape[2:])
    if hw is None:
        return None
    return hw[0], hw[1], geometry.out_size(0, hw[0]), geometry.out_size(1, hw[1])


def batch_of(shape: Any) -> int:
    """The leading dim of a shape, 1 when symbolic or unknown (MACs are per sample then)."""
    if shape is None or not len(shape) or not isinstance(shape[0], int) or shape[0] < 1:
        return 1
    return int(shape[0])


def conv_macs(
    cin: int, cout: int, geometry: ConvGeometry, spatial: tuple[int, int, int, int] | None, batch: int
) -> tuple[int, int, bool]:
    """(MACs of the conv, MACs per unit of rank of the pair, exact?) for one batch.

    Unknown spatial sizes give per-output-pixel counts (the first factor's output width is
    taken as ``stride_w`` times the output width), which still compare correctly.
    """
    kh, kw = geometry.kernel
    if spatial is None:
        return cout * cin * kh * kw, cin * kh * geometry.strides[1] + cout * kw, False
    _, width, ho, wo = spatial
    before = batch * cout * cin * kh * kw * ho * wo
    per_rank = batch * (cin * kh * ho * width + cout * kw * ho * wo)
    return before, per_rank, True
