"""The fusion library: math shared by the fusion passes: per-output-channel affine maps folded into linear producers.

A *linear producer* computes ``y = x ⊛ W + b`` with constant ``W`` (and optional constant ``b``)
and a known output-channel axis:

* ``Conv``: weight ``(Cout, Cin/g, k...)``, channels on weight axis 0 and output axis 1;
* ``ConvTranspose``: weight ``(Cin, Cout/g, k...)``; output channel ``g_i*(Cout/g)+j`` is weight
  ``[g_i*(Cin/g):(g_i+1)*(Cin/g), j]``, so the weight is scaled as ``(g, Cin/g, Cout/g, k...)``;
* ``Gemm``: ``alpha*A'B' + beta*C``; channels on B's axis 1 (axis 0 with ``transB=1``), output axis 1;
* ``MatMul`` with a constant 2-D weight ``(K, N)``, optionally followed by an ``Add`` of a constant
  per-column bias (the pair counts as one producer); channels on the output's last axis.

:func:`fold_into` rewrites ``y = P(x)`` followed by ``z = y*s + t`` (``s``, ``t`` per output
channel) as ``z = P'(x)`` with ``W' = W*s`` per output channel and ``b' = b*s + t``. The math is
done in float64 and cast back to the original dtypes; non-finite results are refused. A weight or
bias that another node also reads gets a fresh constant instead of being modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxcomp import ir

LinearOp = Literal["Conv", "ConvTranspose", "Gemm", "MatMul"]
LINEAR_OPS: tuple[LinearOp, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Linear:
    """A matched linear producer (see the module docstring)."""

    node: ir.Node
    weight: np.ndarray
    channels: int
    out_rank: int | None  # None: unknown (a MatMul whose input rank is unknown)
    min_rank: int  # a lower bound on the output rank
    bias: np.ndarray | None = None  # raw bias constant (Conv B, Gemm C, MatMul's Add operand)
    bias_slot: tuple[ir.Node, int] | None = None  # (node, input index) holding ``bias``
    bias_add: ir.Node | None = None  # MatMul only: the Add holding its bias

    @property
    def op(self) -> str:
        return str(self.node.op)

    @property
    def channel_axis(self) -> int:
        return -1 if self.op == "MatMul" else 1

    def effective_bias(self) -> np.ndarray | None:
        """The bias per output channel, shape ``(C,)`` float64 (Gemm: ``beta*C``)."""
        if self.bias is None:
            return None
        vec = np.broadcast_to(self.bias.astype(np.float64).reshape(-1), (self.channels,))
        if self.op == "Gemm":
            vec = vec * float(self.node.attrs.get("beta", 1.0))
        return np.array(vec)


def _float_constant(tensor: ir.Tensor, what: str, node: ir.Node) -> np.ndarray | str:
    value = ir.constant_value(tensor)
    if value is None:
        return f"the {what} of {ir.describe(node)} is not a constant"
    if value.dtype.name not in ir.FLOAT_DTYPES:
        return f"the {what} of {ir.describe(node)} is {value.dtype.name}, not floating point"
    return value


def _per_last_axis(shape: tuple[int, ...], channels: int) -> bool:
    """True when a constant of ``shape`` broadcasts per channel along the last axis."""
    return all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, channels))


def match_linear(graph: ir.Graph, tensor: ir.Tensor, shapes: ir.Shapes, ops: tuple[str, ...]) -> Linear | str | None:
    """The linear producer of ``tensor``: a :class:`Linear`, a reason it cannot be folded, or None.

    None means ``tensor`` is not produced by one of ``ops`` at all. Whether ``tensor`` feeds only
    the node to fold is the caller's check (:func:`exclusive_reason`).
    """
    node = ir.producer(tensor)
    if node is None:
        return None
    bias_add: ir.Node | None = None
    if node.op == "Add" and "MatMul" in ops:
        split = split_constant_operand(node)
        inner = ir.producer(split[0]) if split is not None else None
        if split is None or inner is None or inner.op != "MatMul" or not ir.is_onnx_op(node):
            return None
        reason = ir.exclusive_reason(graph, split[0], node, inner)
        if reason:
            return reason
        bias_add, node = node, inner
    if node.op not in ops or len(node.inputs) < 2 or not ir.is_onnx_op(node):
        return None
    weight = _float_constant(node.inputs[1], "weight", node)
    if isinstance(weight, str):
        return weight
    if node.op in ("Conv", "ConvTranspose"):
        return _match_conv(node, weight)
    if node.op == "Gemm":
        return _match_gemm(node, weight)
    return _match_matmul(node, weight, bias_add, shapes)


def split_constant_operand(node: ir.Node) -> tuple[ir.Tensor, int] | None:
    """(variable operand, index of the constant operand) of a binary node with one constant."""
    if len(node.inputs) != 2:
        return None
    const = [i for i, t in enumerate(node.inputs) if ir.is_constant(t)]
    if len(const) != 1:
        return None
    return node.inputs[1 - const[0]], const[0]


def _optional_bias(node: ir.Node, index: int) -> tuple[ir.Node, int] | None:
    if len(node.inputs) > index and node.inputs[index].name:
        return node, index
    return None


def _match_conv(node: ir.Node, weight: np.ndarray) -> Linear | str:
    if weight.ndim < 3:
        return f"the weight of {ir.describe(node)} is {weight.ndim}-D"
    group = int(node.attrs.get("group", 1))
    if node.op == "Conv":
        channels = weight.shape[0]
    else:
        if group < 1 or weight.shape[0] % group:
            return f"{ir.describe(node)}: weight of shape {weight.shape} does not split into {group} groups"
        channels = weight.shape[1] * group
    lin = Linear(node, weight, channels, out_rank=weight.ndim, min_rank=weight.ndim)
    slot = _optional_bias(node, 2)
    if slot is not None:
        bias = _float_constant(node.inputs[2], "bias", node)
        if isinstance(bias, str):
            return bias
        if bias.shape != (channels,):
            return f"the bias of {ir.describe(node)} has shape {bias.shape}, expected ({channels},)"
        lin.bias, lin.bias_slot = bias, slot
    return lin


def _match_gemm(node: ir.Node, weight: np.ndarray) -> Linear | str:
    if weight.ndim != 2:
        return f"the weight B of {ir.describe(node)} is {weight.ndim}-D"
    channels = weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[1]
    lin = Linear(node, weight, channels, out_rank=2, min_rank=2)
    slot = _optional_bias(node, 2)
    if slot is not None:
        bias = _float_constant(node.inputs[2], "bias C", node)
        if isinstance(bias, str):
            return bias
        if bias.ndim > 2 or not _per_last_axis(bias.shape, channels):
            return f"the bias C of {ir.describe(node)} has shape {bias.shape}, not scalar, ({channels},) or (1, {channels})"
        lin.bias, lin.bias_slot = bias, slot
    return lin


def _match_matmul(node: ir.Node, weight: np.ndarray, bias_add: ir.Node | None, shapes: ir.Shapes) -> Linear | str:
    if weight.ndim != 2:
        return f"the weight of {ir.describe(node)} is {weight.ndim}-D, not 2-D"
    channels = weight.shape[1]
    x_rank = shapes.rank(node.inputs[0])
    out_rank = None if x_rank is None else max(x_rank, 1)
    lin = Linear(node, weight, channels, out_rank=out_rank, min_rank=1)
    if bias_add is not None:
        split = split_constant_operand(bias_add)
        assert split is not None  # matched in match_linear
        bias = _float_constant(bias_add.inputs[split[1]], "bias", bias_add)
        if isinstance(bias, str):
            return bias
        if not _per_last_axis(bias.shape, channels) or (out_rank is not None and bias.ndim > out_rank):
            return f"the bias of {ir.describe(bias_add)} has shape {bias.shape}, not per output column"
        lin.bias, lin.bias_slot, lin.bias_add = bias, (bias_add, split[1]), bias_add
        lin.min_rank = max(1, bias.ndim)
    return lin


def channel_vector(lin: Linear, value: np.ndarray) -> np.ndarray | str:
    """A constant operand of ``lin``'s output as a ``(C,)`` float64 vector, or why it is not one.

    The constant must broadcast along the output-channel axis only and must not raise the
    output's rank (a MatMul of unknown rank accepts constants up to its known minimum rank).
    """
    rank = lin.out_rank if lin.out_rank is not None else lin.min_rank
    if value.ndim > rank:
        return f"a constant of shape {value.shape} would broadcast the {rank}-D output of {ir.describe(lin.node)}"
    padded = (1,) * (rank - value.ndim) + tuple(value.shape)
    axis = lin.channel_axis % rank
    if any(d != 1 for i, d in enumerate(padded) if i != axis) or padded[axis] not in (1, lin.channels):
        return (
            f"a constant of shape {value.shape} is not per output channel of {ir.describe(lin.node)} "
            f"({lin.channels} channels on axis {axis} of {rank})"
        )
    return np.array(np.broadcast_to(value.astype(np.float64).reshape(-1), (lin.channels,)))


def _scaled_weight(lin: Linear, scale: np.ndarray) -> np.ndarray:
    w = lin.weight.astype(np.float64)
    if lin.op == "Conv":
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif lin.op == "ConvTranspose":
        group = int(lin.node.attrs.get("group", 1))
        cin, cout_g, *kernel = w.shape
        grouped = w.reshape(group, cin // group, cout_g, *kernel)
        w = (grouped * scale.reshape((group, 1, cout_g) + (1,) * len(kernel))).reshape(w.shape)
    elif lin.op == "Gemm" and lin.node.attrs.get("transB", 0):
        w = w * scale[:, None]
    else:  # Gemm (K, N) and MatMul
        w = w * scale[None, :]
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked by the caller
        return w.astype(lin.weight.dtype)


def _all_finite(array: np.ndarray) -> bool:
    return bool(np.isfinite(array.astype(np.float64)).all())


def fold_into(graph: ir.Graph, lin: Linear, scale: np.ndarray, shift: np.ndarray, folded: ir.Node) -> str | None:
    """Fold ``folded`` (``z = y*scale + shift`` on ``lin``'s output ``y``) into ``lin``.

    Returns why it could not (nothing is changed then), or None once ``lin`` produces ``folded``'s
    output and ``folded`` is disconnected. A bias is created where needed: Conv/ConvTranspose
    input B, Gemm input C (with ``beta=1``), or a new ``Add`` after a bare MatMul.
    """
    weight = _scaled_weight(lin, scale)
    old_bias = lin.effective_bias()
    need_bias = old_bias is not None or bool(np.any(shift != 0))
    bias_dtype = (lin.bias if lin.bias is not None else lin.weight).dtype
    with np.errstate(over="ignore", invalid="ignore"):
        bias = ((old_bias if old_bias is not None else 0.0) * scale + shift).astype(bias_dtype)
    if not _all_finite(weight) or (need_bias and not _all_finite(bias)):
        return f"folding into {ir.describe(lin.node)} gives non-finite values"

    ir.write_input(graph, lin.node, 1, weight)
    out = folded.outputs[0]
    folded.inputs.clear()
    folded.outputs.clear()
    base = lin.node.name or lin.op
    if lin.bias_slot is not None:
        node, index = lin.bias_slot
        if lin.op == "MatMul":
            assert lin.bias is not None  # a bias slot always has a bias
            shape = (1,) * (lin.bias.ndim - 1) + (lin.channels,) if lin.bias.ndim else (lin.channels,)
            bias = bias.reshape(shape)
        ir.write_input(graph, node, index, bias)
    elif need_bias and lin.op == "MatMul":
        const = ir.make_constant(ir.unique_name(graph, f"{base}_bias"), bias)
        ir.make_node(graph, "Add", [lin.node.outputs[0], const], [out], name=f"{base}_bias_add")
        return None
    elif need_bias:
        const = ir.make_constant(ir.unique_name(graph, f"{base}_bias"), bias)
        if len(lin.node.inputs) > 2:
            lin.node.inputs[2] = const
        else:
            lin.node.inputs.append(const)
    if lin.op == "Gemm" and need_bias:
        lin.node.attrs["beta"] = 1.0
    (lin.bias_add or lin.node).outputs[0] = out
    return None


def batchnorm_affine(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """``(scale, shift)`` of an inference-form BatchNormalization, or why it is not one.

    ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``, float64 of shape (C,).
    """
    if not ir.is_onnx_op(node):
        return f"it is in domain {node.domain!r}, not ai.onnx"
    if node.attrs.get("training_mode", 0):
        return "training_mode=1 (normalizes with batch statistics)"
    if not node.attrs.get("spatial", 1):
        return "spatial=0 (per-element statistics) is not supported"
    if any(t.name for t in node.outputs[1:]):
        return "it has running-statistics outputs (training form)"
    if len(node.inputs) != 5:
        return f"it has {len(node.inputs)} inputs, expected 5"
    params = []
    for tensor, what in zip(node.inputs[1:], ("scale", "B", "mean", "var"), strict=True):
        value = ir.constant_value(tensor)
        if value is None:
            return f"its {what} input {tensor.name!r} is not a constant"
        if value.ndim != 1 or value.dtype.name not in ir.FLOAT_DTYPES:
            return f"its {what} input {tensor.name!r} is {value.dtype.name} {value.shape}, expected a float vector"
        params.append(value.astype(np.float64))
    gamma, beta, mean, var = params
    if len({p.shape for p in params}) != 1:
        return "its parameters have different lengths"
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        shift = beta - mean * scale
    if not (_all_finite(scale) and _all_finite(shift)):
        return "its folded scale/shift are not finite (variance + epsilon <= 0?)"
    return scale, shift
