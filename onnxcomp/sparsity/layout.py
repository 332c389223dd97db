"""Where a group of channels sits in a tensor, tensor shapes on demand, and small constant folding.

A channel group of ``C`` channels occupies one axis of each tensor it flows through. Along that
axis, element ``(o*C + c)*inner + j`` (``o < outer``, ``j < inner``) belongs to channel ``c``: a
plain channel axis has ``outer = inner = 1``; ``Flatten`` of ``[N, C, H, W]`` gives the 2-D
``[N, C*H*W]`` with ``inner = H*W`` (each channel expands to its flattened positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from onnx import helper

from onnxcomp import ir


@dataclass(frozen=True)
class Layout:
    """The channel axis of one tensor (``axis`` of ``rank``) and how channels expand along it."""

    axis: int
    rank: int
    channels: int
    outer: int = 1
    inner: int = 1

    @property
    def size(self) -> int:
        return self.outer * self.channels * self.inner

    @property
    def neg(self) -> int:
        """The axis counted from the end (what broadcasting aligns)."""
        return self.axis - self.rank

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.inner == 1

    def at_rank(self, rank: int) -> Layout:
        """The same channels in a tensor of ``rank`` aligned from the end (broadcasting)."""
        return replace(self, axis=rank + self.neg, rank=rank)

    def positions(self, keep: np.ndarray) -> np.ndarray:
        """Indices along the axis of the kept channels (sorted ``keep`` -> sorted indices)."""
        keep = np.asarray(keep, dtype=np.int64)
        o = np.arange(self.outer)[:, None, None]
        j = np.arange(self.inner)[None, None, :]
        return ((o * self.channels + keep[None, :, None]) * self.inner + j).reshape(-1)

    def owner(self) -> np.ndarray:
        """The channel of each index along the axis."""
        return (np.arange(self.size) // self.inner) % self.channels


class Shapes:
    """Tensor ranks and dims from shape info; runs ``ir.infer_shapes`` at most once, on demand."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._inferred = False

    def shape(self, tensor: ir.Tensor) -> list[int | str | None] | None:
        value = folded_value(tensor)
        if value is not None:
            return list(value.shape)
        if tensor.shape is None and not self._inferred:
            self._inferred = True
            ir.infer_shapes(self.graph)
        return None if tensor.shape is None else list(tensor.shape)

    def rank(self, tensor: ir.Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def dim(self, tensor: ir.Tensor, axis: int) -> int | None:
        """A static dim (None when unknown or symbolic)."""
        shape = self.shape(tensor)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        value = shape[axis]
        return value if isinstance(value, int) and value >= 0 else None


def int_list(tensor: ir.Tensor | None) -> list[int] | None:
    """The values of a constant integer tensor as a list (None when absent or not constant)."""
    if tensor is None or not tensor.name:
        return None
    value = folded_value(tensor)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def raw_axes(node: ir.Node) -> list[int] | None:
    """The ``axes`` of a node as written (attribute, or input 1 at newer opsets); None if absent."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    return int_list(node.inputs[1]) if len(node.inputs) > 1 else None


def node_axes(node: ir.Node, rank: int) -> list[int] | None:
    """Sorted non-negative ``axes`` of a node for an input (Unsqueeze: output) of ``rank``."""
    axes = raw_axes(node)
    return None if axes is None else sorted(a % rank for a in axes)


_FOLDABLE = ("Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Flatten")


def folded_value(tensor: ir.Tensor, depth: int = 0) -> np.ndarray | None:
    """The value of a constant, or of a short chain of shape ops/casts over constants (else None)."""
    value = ir.constant_value(tensor)
    if value is not None or depth > 8:
        return value
    node = ir.producer(tensor)
    if node is None or node.op not in _FOLDABLE or node.domain not in (None, "", "ai.onnx"):
        return None
    x = folded_value(node.inputs[0], depth + 1) if node.inputs else None
    if x is None:
        return None
    if node.op == "Identity":
        return x
    if node.op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    if node.op == "Reshape":
        shape = int_list(node.inputs[1]) if len(node.inputs) > 1 else None
        if shape is None or node.attrs.get("allowzero", 0):
            return None
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])
    if node.op == "Unsqueeze":
        axes = raw_axes(node)
        return None if axes is None else np.expand_dims(x, tuple(node_axes(node, x.ndim + len(axes)) or ()))
    axes = node_axes(node, x.ndim)
    if axes is None:
        return np.squeeze(x) if len(node.inputs) < 2 or not node.inputs[1].name else None
    return np.squeeze(x, tuple(axes))
