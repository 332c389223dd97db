"""The one definition of a constant weight, shared by every pass.

A node input is a *constant weight* when its value is known without running the model: an
initializer, a ``Constant`` node, or a short chain of value-preserving ops over them that exporters
write in front of weights (Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Identity, Cast such as
bf16/fp16 -> fp32, and Mul/Div by a constant). :func:`folded_value` computes such a value,
:func:`float_weight` says why an input is not a usable float weight (including "already quantized"
for a DequantizeLinear of stored codes or a Cast of FP8 / FP4 codes), and :func:`fold_constant_input` replaces the chain by one
initializer before a pass rewrites the weight, so every pass reads and writes the same tensor.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from onnxcomp.ir.graph import (
    Constant,
    Node,
    Tensor,
    constant_value,
    consumers,
    is_graph_output,
    make_constant,
    producer,
    unique_name,
)

#: Element types that count as floating point for weights and affine constants.
FLOAT_DTYPES: frozenset[str] = frozenset({"float16", "float32", "float64", "bfloat16"})

#: Single-input ops that only move or re-type a constant's values (folded by :func:`folded_value`).
VALUE_PRESERVING_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Flatten", "Transpose")
#: Two-input elementwise ops folded when both operands are constant (a weight scaled by a constant).
SCALING_OPS = ("Mul", "Div")

#: Deeper chains are not weights an exporter writes; stopping bounds the recursion.
_MAX_DEPTH = 8


def is_onnx_op(node: Node) -> bool:
    """True for an operator of the default (ai.onnx) domain."""
    return node.domain in (None, "", "ai.onnx")


def describe(node: Node) -> str:
    """``Conv 'name'`` (or ``Conv writing 'tensor'`` for an unnamed node) for messages."""
    if node.name or not node.outputs:
        return f"{node.op} {node.name!r}"
    return f"{node.op} writing {node.outputs[0].name!r}"


def int_list(tensor: Tensor | None) -> list[int] | None:
    """The values of a constant integer tensor as a list (None when absent or not constant)."""
    if tensor is None or not tensor.name:
        return None
    value = folded_value(tensor)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def raw_axes(node: Node) -> list[int] | None:
    """The ``axes`` of a node as written (attribute, or input 1 at newer opsets); None if absent."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    return int_list(node.inputs[1]) if len(node.inputs) > 1 else None


def node_axes(node: Node, rank: int) -> list[int] | None:
    """Sorted non-negative ``axes`` of a node for an input (Unsqueeze: output) of ``rank``."""
    axes = raw_axes(node)
    return None if axes is None else sorted(a % rank for a in axes)


def folded_value(tensor: Tensor, depth: int = 0) -> np.ndarray | None:
    """The value of a constant, or of a short chain of value-preserving/scaling ops over constants."""
    value = constant_value(tensor)
    if value is not None or depth > _MAX_DEPTH:
        return value
    node = producer(tensor)
    if node is None or not is_onnx_op(node) or not node.inputs:
        return None
    if node.op in SCALING_OPS:
        return _fold_scaling(node, depth)
    if node.op not in VALUE_PRESERVING_OPS:
        return None
    x = folded_value(node.inputs[0], depth + 1)
    return None if x is None else _fold_one(node, x)


def _fold_scaling(node: Node, depth: int) -> np.ndarray | None:
    if len(node.inputs) != 2:
        return None
    a, b = (folded_value(t, depth + 1) for t in node.inputs)
    if a is None or b is None or a.dtype != b.dtype or a.dtype.name not in FLOAT_DTYPES:
        return None
    return np.asarray(a * b if node.op == "Mul" else a / b, dtype=a.dtype)


def _fold_one(node: Node, x: np.ndarray) -> np.ndarray | None:
    if node.op == "Identity":
        return x
    if node.op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return np.ascontiguousarray(np.transpose(x, None if perm is None else [int(p) for p in perm]))
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
    axes = node_axes(node, x.ndim)  # Squeeze
    if axes is None:
        return np.squeeze(x) if len(node.inputs) < 2 or not node.inputs[1].name else None
    return np.squeeze(x, tuple(axes))


def quantized_source(tensor: Tensor, depth: int = 0) -> Node | None:
    """The DequantizeLinear that decodes stored constant codes into ``tensor`` (through a chain), or None."""
    node = producer(tensor)
    if node is None or depth > _MAX_DEPTH or not node.inputs:
        return None
    if node.op == "DequantizeLinear":
        return node if folded_value(node.inputs[0]) is not None else None
    if node.op == "Cast" and _float_codes(node.inputs[0]):
        return node  # FP8 / FP4 codes decoded by a Cast (the form onnxruntime folds at load)
    if node.op in VALUE_PRESERVING_OPS or node.op in SCALING_OPS:
        return quantized_source(node.inputs[0], depth + 1)
    return None


def _float_codes(tensor: Tensor) -> bool:
    """A constant of an 8- or 4-bit float type: stored low-bit codes, never a float weight."""
    value = constant_value(tensor)
    return value is not None and value.dtype.name.startswith(("float8", "float4"))


def float_weight(node: Node, index: int, what: str) -> np.ndarray | str:
    """The constant floating-point input ``index`` of ``node`` (folded through a chain), or why it is not one.

    Every pass asks this one question; the reasons are what ``--verbose`` prints.
    """
    if len(node.inputs) <= index or not node.inputs[index].name:
        return f"{describe(node)} has no {what}"
    tensor = node.inputs[index]
    dq = quantized_source(tensor)
    if dq is not None:
        return f"the {what} {tensor.name!r} of {describe(node)} is already quantized (read through {describe(dq)})"
    value = folded_value(tensor)
    if value is None:
        if node.op == "MatMul" and index == 1 and folded_value(node.inputs[0]) is not None:
            return (
                f"the constant operand of {describe(node)} is its first input (A), not B; "
                "only a constant second input is handled here"
            )
        return f"the {what} {tensor.name!r} of {describe(node)} is not a constant"
    if value.dtype.name not in FLOAT_DTYPES:
        return f"the {what} {tensor.name!r} of {describe(node)} is {value.dtype.name}, not floating point"
    return value


def fold_constant_input(graph, node: Node, index: int) -> Constant | None:  # noqa: ANN001 - ir.Graph
    """Make input ``index`` of ``node`` a plain initializer holding its folded value; None if not constant.

    An initializer is returned as it is. A Constant node's output or a foldable chain is replaced,
    for every reader of that tensor (so a shared weight stays shared), by one new initializer; the
    chain becomes dead and the manager's tidy-up removes it. A graph output keeps its chain.
    """
    tensor = node.inputs[index]
    if isinstance(tensor, Constant):
        return tensor
    value = folded_value(tensor)
    if value is None:
        return None
    const = make_constant(unique_name(graph, f"{tensor.name}_folded"), value)
    for reader in consumers(tensor):
        for i, t in enumerate(reader.inputs):
            if t is tensor:
                reader.inputs[i] = const
    return const


def fold_growth(tensor: Tensor) -> int:
    """Bytes the initializers would grow by if ``tensor``'s chain were folded into one initializer.

    The folded value costs its size; the chain's constant leaves read only by the chain are saved.
    Used to keep folds that would make a file larger (a Cast fp16 -> fp32, a shared source) out of
    passes that do not shrink the weight afterwards.
    """
    value = folded_value(tensor)
    if value is None or constant_value(tensor) is not None:
        return 0  # already an initializer, or a Constant node whose value just moves
    chain: set[int] = set()
    leaves: dict[int, Tensor] = {}

    def walk(t: Tensor, depth: int) -> None:
        prod = producer(t)
        if constant_value(t) is not None or prod is None or depth > _MAX_DEPTH:
            leaves[id(t)] = t
            return
        chain.add(id(prod))
        for inp in prod.inputs:
            walk(inp, depth + 1)

    walk(tensor, 0)
    saved = 0
    for leaf in leaves.values():
        readers = consumers(leaf)
        if readers and all(id(r) in chain for r in readers):
            leaf_value = constant_value(leaf)
            saved += 0 if leaf_value is None else int(leaf_value.nbytes)
    return int(value.nbytes) - saved


def is_foldable_chain(graph, tensor: Tensor) -> bool:  # noqa: ANN001 - ir.Graph
    """True when ``tensor`` is a constant computed by a chain (or Constant node), not an initializer."""
    return not isinstance(tensor, Constant) and not is_graph_output(graph, tensor) and folded_value(tensor) is not None
