"""The spatial ops (convolutions, pooling, resizing) of the interpreter, with ONNX's padding rules.

ONNX pads each side of each axis on its own (``pads``, ``auto_pad``); torch pads symmetrically, so
an asymmetric padding is applied with ``F.pad`` first (``-inf`` for max pooling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from onnxcomp.qat.engine import torch
from onnxcomp.qat.ops import OPS, Inputs, Tensor, _ints, _x, op

F = torch.nn.functional


def _spatial_padding(x: Tensor, attrs: dict[str, Any], kernel: Sequence[int], fill: float) -> tuple[Tensor, list[int]]:
    """The input padded as ONNX ``pads``/``auto_pad`` say; returns it and torch's symmetric padding (0s)."""
    n = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads_begin.append(small if auto == "SAME_UPPER" else big)
            pads_end.append(big if auto == "SAME_UPPER" else small)
    elif auto == "VALID":
        pads_begin, pads_end = [0] * n, [0] * n
    else:
        pads = list(attrs.get("pads", [0] * (2 * n)))
        pads_begin, pads_end = pads[:n], pads[n:]
    if pads_begin == pads_end:
        return x, pads_begin
    torch_pads: list[int] = []
    for i in reversed(range(n)):  # F.pad lists the last axis first
        torch_pads += [pads_begin[i], pads_end[i]]
    return F.pad(x, torch_pads, value=fill), [0] * n


@op("Conv")
def _conv(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x, w = _x(inputs, 0), _x(inputs, 1)
    b = inputs[2] if len(inputs) > 2 else None
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    x, padding = _spatial_padding(x, attrs, kernel, 0.0)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    strides = list(attrs.get("strides", [1] * len(kernel)))
    dilations = list(attrs.get("dilations", [1] * len(kernel)))
    return [fn(x, w, b, strides, padding, dilations, int(attrs.get("group", 1)))]


@op("ConvTranspose")
def _conv_transpose(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x, w = _x(inputs, 0), _x(inputs, 1)
    b = inputs[2] if len(inputs) > 2 else None
    n = w.dim() - 2
    pads = list(attrs.get("pads", [0] * (2 * n)))
    if pads[:n] != pads[n:] or "output_shape" in attrs or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError("ConvTranspose with asymmetric pads, auto_pad or output_shape")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    return [
        fn(
            x,
            w,
            b,
            list(attrs.get("strides", [1] * n)),
            pads[:n],
            list(attrs.get("output_padding", [0] * n)),
            int(attrs.get("group", 1)),
            list(attrs.get("dilations", [1] * n)),
        )
    ]


OPS["GlobalAveragePool"] = lambda inputs, attrs, opset: [
    _x(inputs).mean(dim=tuple(range(2, _x(inputs).dim())), keepdim=True)
]
OPS["GlobalMaxPool"] = lambda inputs, attrs, opset: [
    torch.amax(_x(inputs), dim=tuple(range(2, _x(inputs).dim())), keepdim=True)
]


@op("MaxPool")
def _max_pool(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    kernel = list(attrs["kernel_shape"])
    x, padding = _spatial_padding(_x(inputs), attrs, kernel, -math.inf)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    strides = list(attrs.get("strides", [1] * len(kernel)))
    dilations = list(attrs.get("dilations", [1] * len(kernel)))
    return [fn(x, kernel, strides, padding, dilations, bool(attrs.get("ceil_mode", 0)))]


@op("AveragePool")
def _avg_pool(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    kernel = list(attrs["kernel_shape"])
    include = bool(attrs.get("count_include_pad", 0))
    x = _x(inputs)
    padded, padding = _spatial_padding(x, attrs, kernel, 0.0)
    if padded is not x and not include:
        raise NotImplementedError("AveragePool with asymmetric pads excluded from the count")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    strides = list(attrs.get("strides", kernel))
    return [fn(padded, kernel, strides, padding, bool(attrs.get("ceil_mode", 0)), include)]


@op("Resize")
def _resize(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    sizes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else []
    scales = inputs[2].reshape(-1).tolist() if len(inputs) > 2 and inputs[2] is not None else []
    size = sizes[2:] if sizes else [int(math.floor(d * s)) for d, s in zip(x.shape[2:], scales[2:], strict=True)]
    ct = attrs.get("coordinate_transformation_mode", b"half_pixel")
    ct = ct.decode() if isinstance(ct, bytes) else str(ct)
    if mode == "nearest":
        nearest = attrs.get("nearest_mode", b"round_prefer_floor")
        if ct != "asymmetric" or nearest not in (b"floor", "floor"):
            raise NotImplementedError(f"Resize nearest with {ct} coordinates")
        return [F.interpolate(x, size=size, mode="nearest")]
    if mode == "linear" and ct in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        kind = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
        return [F.interpolate(x, size=size, mode=kind, align_corners=ct == "align_corners")]
    raise NotImplementedError(f"Resize mode {mode} with {ct} coordinates")


#: The op types this module registers (imported by the interpreter so that they are registered).
SPATIAL_OPS = ("Conv", "ConvTranspose", "GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "Resize")
