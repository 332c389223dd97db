"""One torch function per ONNX op: the ops of the models onnxcomp meets (ONNX operator semantics).

Each function takes the node's inputs (``None`` for an omitted optional input), its attributes
as Python values and the model's default-domain opset, and returns its outputs. Shapes, axes and
indices read from tensors are eager Python values: the interpreter runs the graph as it is, once
per batch, like onnxruntime does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from onnxcomp.qat.engine import torch

F = torch.nn.functional
Tensor = torch.Tensor
Inputs = list[Tensor | None]
OpFn = Callable[[Inputs, dict[str, Any], int], list[Tensor]]

#: ONNX element type -> torch dtype (the types Cast and ConstantOfShape meet).
TORCH_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}

OPS: dict[str, OpFn] = {}


def op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(inputs: Inputs, attrs: dict[str, Any], index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or from input ``index`` (newer ones); None if absent."""
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return None


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda inputs, attrs, opset: [fn(_x(inputs))]


def _x(inputs: Inputs, i: int = 0) -> Tensor:
    t = inputs[i]
    assert t is not None, f"input {i} is required"
    return t


_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Not": torch.logical_not,
    "Identity": lambda x: x,
}
for _name, _fn in _UNARY.items():
    OPS[_name] = _unary(_fn)


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "And": torch.logical_and,
    "Or": torch.logical_or,
}
for _name, _bin in _BINARY.items():
    OPS[_name] = (lambda fn: lambda inputs, attrs, opset: [fn(_x(inputs, 0), _x(inputs, 1))])(_bin)


@op("Pow")
def _pow(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x, y = _x(inputs, 0), _x(inputs, 1)
    if y.numel() == 1 and float(y) == 2.0:
        return [x * x]  # what onnxruntime computes for a square, to the last bit
    return [torch.pow(x, y.to(x.dtype))]


def _fold(fn: Callable[[Tensor, Tensor], Tensor], mean: bool = False) -> OpFn:
    def run(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
        out = _x(inputs, 0)
        for t in inputs[1:]:
            out = fn(out, _x([t]))
        return [out / len(inputs) if mean else out]

    return run


OPS["Max"], OPS["Min"] = _fold(torch.maximum), _fold(torch.minimum)
OPS["Sum"], OPS["Mean"] = _fold(torch.add), _fold(torch.add, mean=True)


@op("Where")
def _where(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    return [torch.where(_x(inputs, 0).bool(), _x(inputs, 1), _x(inputs, 2))]


@op("Clip")
def _clip(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    lo = inputs[1] if len(inputs) > 1 else None
    hi = inputs[2] if len(inputs) > 2 else None
    low = float(lo) if lo is not None else attrs.get("min")
    high = float(hi) if hi is not None else attrs.get("max")
    return [torch.clamp(x, low, high)]


@op("HardSigmoid")
def _hard_sigmoid(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    return [torch.clamp(_x(inputs) * alpha + beta, 0.0, 1.0)]


@op("HardSwish")
def _hard_swish(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    return [x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)]


@op("LeakyRelu")
def _leaky_relu(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    return [F.leaky_relu(_x(inputs), float(attrs.get("alpha", 0.01)))]


@op("Gemm")
def _gemm(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    a, b = _x(inputs, 0), _x(inputs, 1)
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    y = a @ b
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    y = y * alpha if alpha != 1.0 else y
    c = inputs[2] if len(inputs) > 2 else None
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return [y]


@op("MatMul")
def _matmul(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    return [torch.matmul(_x(inputs, 0), _x(inputs, 1))]


@op("BatchNormalization")
def _batch_norm(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x, scale, bias, mean, var = (_x(inputs, i) for i in range(5))
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(attrs.get("epsilon", 1e-5)))]


@op("LayerNormalization")
def _layer_norm(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x, scale = _x(inputs, 0), _x(inputs, 1)
    bias = inputs[2] if len(inputs) > 2 else None
    axis = int(attrs.get("axis", -1)) % x.dim()
    return [F.layer_norm(x, list(x.shape[axis:]), scale, bias, float(attrs.get("epsilon", 1e-5)))]


def _softmax_op(log: bool) -> OpFn:
    def run(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
        x = _x(inputs)
        fn = torch.log_softmax if log else torch.softmax
        if opset >= 13:
            return [fn(x, int(attrs.get("axis", -1)))]
        axis = int(attrs.get("axis", 1)) % x.dim()  # opset < 13: coerced to 2-D at axis
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return [fn(flat, 1).reshape(x.shape)]

    return run


OPS["Softmax"], OPS["LogSoftmax"] = _softmax_op(False), _softmax_op(True)


@op("Reshape")
def _reshape(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    shape = _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@op("Flatten")
def _flatten(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    axis = int(attrs.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


@op("Transpose")
def _transpose(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    perm = list(attrs.get("perm", reversed(range(x.dim()))))
    return [x.permute(perm)]


@op("Concat")
def _concat(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    tensors = [t for t in inputs if t is not None]
    return [torch.cat(tensors, int(attrs["axis"]))]


@op("Split")
def _split(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    axis = int(attrs.get("axis", 0))
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else list(attrs.get("split", []))
    if not sizes:
        parts = int(attrs.get("num_outputs", attrs.get("_outputs", 1)))
        sizes = [-(-x.shape[axis] // parts)] * parts
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return list(torch.split(x, sizes, axis))


@op("Squeeze")
def _squeeze(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    axes = _axes(inputs, attrs, 1)
    if axes is None:
        return [x.squeeze()]
    return [x.squeeze(tuple(a % x.dim() for a in axes))]


@op("Unsqueeze")
def _unsqueeze(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    axes = _axes(inputs, attrs, 1) or []
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return [x]


@op("Shape")
def _shape(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    dims = list(_x(inputs).shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


@op("Gather")
def _gather(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x, idx = _x(inputs, 0), _x(inputs, 1).long()
    axis = int(attrs.get("axis", 0)) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))]


@op("Slice")
def _slice(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    if opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes, steps = list(attrs.get("axes", range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step <= 0:
            raise NotImplementedError("Slice with a negative step")
        size = x.shape[axis % x.dim()]
        index[axis % x.dim()] = slice(max(-size, min(start, size)), max(-size, min(end, size)), step)
    return [x[tuple(index)]]


@op("Cast")
def _cast(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    return [_x(inputs).to(TORCH_DTYPES[int(attrs["to"])])]


@op("ConstantOfShape")
def _constant_of_shape(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    value = attrs.get("value")
    fill = np.zeros(1, np.float32) if value is None else value
    return [torch.full(_ints(inputs[0]), fill.reshape(-1)[0].item(), dtype=torch.from_numpy(np.array(fill)).dtype)]


@op("Expand")
def _expand(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1])))  # ONNX Expand broadcasts both ways
    return [x.expand(shape)]


@op("Dropout")
def _dropout(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
    x = _x(inputs)
    return [x, torch.ones_like(x, dtype=torch.bool)]  # inference: identity and an all-true mask


def _reduce(fn: Callable[..., Tensor], axes_input_opset: int) -> OpFn:
    def run(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[Tensor]:
        x = _x(inputs)
        axes = _axes(inputs, attrs, 1) if opset >= axes_input_opset or "axes" in attrs else None
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, dim=tuple(a % x.dim() for a in axes), keepdim=keep)]

    return run


def _amax(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.amax(x, dim=dim, keepdim=keepdim)


OPS["ReduceMean"] = _reduce(torch.mean, 18)
OPS["ReduceSum"] = _reduce(torch.sum, 13)
OPS["ReduceMax"] = _reduce(_amax, 18)
