"""Weight-only MatMul / Gemm written as ``com.microsoft.MatMulNBits`` (``docs/onnxruntime.md#fused-patterns``).

onnxruntime turns ``DequantizeLinear(weight) -> MatMul`` into MatMulNBits itself, but only for a
plain MatMul: a MatMul followed by a bias Add becomes a float Gemm first, and a Gemm with
``transB = 1`` is never converted, so those weights are dequantized at every run. Writing the
kernel directly keeps every weight-only MatMul/Gemm on the packed low-bit kernel, bias included.

MatMulNBits stores ``B`` transposed, as unsigned codes ``[N, blocks, block_size * bits / 8]``
(4-bit: two codes a byte, the lower-index code in the low nibble), one float scale per (column,
block) and optional packed unsigned zero points (default ``2^(bits-1)``); it computes
``(q - zp) * scale`` per block. Signed codes are shifted by ``2^(bits-1)`` with their zero points,
so the dequantized values are exactly those of the DequantizeLinear form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp import ir
from onnxcomp.formats.nbits import pack_rows, transposed
from onnxcomp.quant.qweight import QuantizedWeight

#: Storage dtypes MatMulNBits takes, with their bit width and whether they are signed.
_BITS = {"int4": (4, True), "uint4": (4, False), "int8": (8, True), "uint8": (8, False)}
MIN_BLOCK = 16


@dataclass(frozen=True)
class PackedWeight:
    """The MatMulNBits inputs and attributes of one weight."""

    b: np.ndarray  # uint8 [N, blocks, blob]
    scales: np.ndarray  # float32 [N * blocks]
    zero_points: np.ndarray | None  # uint8, packed; None when every zero point is the default
    k: int
    n: int
    bits: int
    block_size: int


def _next_pow2(value: int) -> int:
    return 1 << max(int(value) - 1, 0).bit_length()


def _unsigned_codes(codes: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """One-byte codes (every ``_BITS`` dtype) as MatMulNBits' unsigned uint8 values: signed ones
    shifted by 2^(bits-1), in uint8 arithmetic (ml_dtypes' int4 holds its two's complement nibble in
    the low bits of a byte)."""
    raw = codes.view(np.uint8)
    if not signed:
        return raw
    return (raw + np.uint8(1 << (bits - 1))) & np.uint8((1 << bits) - 1)


def pack_weight(qw: QuantizedWeight, is_transposed: bool) -> PackedWeight | str:
    """``qw`` (a 2-D weight ``(K, N)``, or ``(N, K)`` when ``is_transposed``) for MatMulNBits, or why not."""
    kind = _BITS.get(qw.codes.dtype.name)
    if qw.storage != "dq" or kind is None or qw.zero_point is None:
        return f"weights stored as {qw.codes.dtype.name} ({qw.storage}) have no MatMulNBits form"
    if qw.codes.ndim != 2:
        return f"MatMulNBits needs a 2-D weight, this one is {qw.codes.ndim}-D"
    bits, signed = kind
    codes = _unsigned_codes(qw.codes, bits, signed)
    zero = _unsigned_codes(np.asarray(qw.zero_point), bits, signed)
    scale = np.asarray(qw.scale, np.float32)
    q = codes if is_transposed else transposed(codes)  # (N, K)
    n, k = q.shape
    if qw.block_size:
        block = qw.block_size
        if block < MIN_BLOCK or block & (block - 1):
            return f"group size {block} is not a power of two >= {MIN_BLOCK}"
        blocks = -(-k // block)
        s = scale if is_transposed else scale.T  # (N, blocks)
        z = zero if is_transposed else zero.T
    else:
        block = max(MIN_BLOCK, _next_pow2(k))  # per channel / per tensor: one block spans K
        blocks = 1
        s = np.broadcast_to(scale.reshape(-1, 1), (n, 1)) if scale.size > 1 else np.full((n, 1), scale.item())
        z = np.broadcast_to(zero.reshape(-1, 1), (n, 1)) if zero.size > 1 else np.full((n, 1), zero.item())
    s = np.ascontiguousarray(s, np.float32).reshape(n, blocks)
    z = np.ascontiguousarray(z, np.uint8).reshape(n, blocks)
    if k == blocks * block:
        padded = np.ascontiguousarray(q).reshape(n, blocks, block)
    else:
        padded = np.repeat(z, block, axis=1)  # padding codes dequantize to exactly 0
        padded[:, :k] = q
        padded = padded.reshape(n, blocks, block)
    default = 1 << (bits - 1)
    zero_points = None if np.all(z == default) else pack_rows(z, bits)
    return PackedWeight(pack_rows(padded, bits), s.reshape(-1), zero_points, k, n, bits, block)


def bias_add(graph: ir.Graph, node: ir.Node, n: int) -> tuple[ir.Node, np.ndarray] | None:
    """The ``Add`` of a constant per-column bias that alone reads a MatMul's output, if any."""
    out = node.outputs[0]
    readers = ir.consumers(out)
    if len(readers) != 1 or ir.is_graph_output(graph, out) or readers[0].op != "Add":
        return None
    add = readers[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    value = ir.constant_value(other)
    if value is None or value.dtype != np.float32 or value.size != n or value.shape[-1:] != (n,):
        return None
    return add, value.reshape(n)


def weight_constants(graph: ir.Graph, packed: PackedWeight, name: str) -> list[ir.Tensor]:
    """The B, scales and zero-point inputs of MatMulNBits (shared by every node reading the weight)."""
    const = ir.make_constant
    return [
        const(ir.unique_name(graph, f"{name}_nbits"), packed.b),
        const(ir.unique_name(graph, f"{name}_nbits_scale"), packed.scales),
        const(ir.unique_name(graph, f"{name}_nbits_zero_point"), packed.zero_points)
        if packed.zero_points is not None
        else ir.omitted(),
    ]


def emit_matmulnbits(
    graph: ir.Graph,
    node: ir.Node,
    packed: PackedWeight,
    weight: list[ir.Tensor],
    bias: np.ndarray | None,
    output: ir.Tensor,
    accuracy_level: int,
) -> ir.Node:
    """A MatMulNBits node computing ``node``'s input 0 times the packed ``weight`` (+ bias) into ``output``."""
    const = ir.make_constant
    name = weight[0].name
    inputs: list[ir.Tensor] = [node.inputs[0], *weight]
    if bias is not None:
        inputs += [ir.omitted(), const(ir.unique_name(graph, f"{name}_bias"), bias.astype(np.float32))]
    attrs = {
        "K": packed.k,
        "N": packed.n,
        "bits": packed.bits,
        "block_size": packed.block_size,
        "accuracy_level": accuracy_level,
    }
    original = node.name
    node.name = ir.unique_name(graph, f"{original}_replaced")  # the kernel keeps the node's name
    new = ir.make_node(graph, "MatMulNBits", inputs, [output], f"{name}_MatMulNBits", attrs, domain="com.microsoft")
    if original:
        new.name = original
    node.inputs.clear()
    node.outputs.clear()  # the replaced node is dead: finalize removes it
    return new
