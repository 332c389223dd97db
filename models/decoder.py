"""LLM-shaped decoder stacks with seeded random weights, written with external data.

    python models/decoder.py OUT.onnx --size 2.5GB          # layers chosen to reach the size
    python models/decoder.py OUT.onnx --layers 2 --hidden 64 --heads 4 --ffn 128 --vocab 256

The model is what exported decoder-only LLMs look like to onnxcomp: token embedding (Gather),
per layer an RMSNorm spelled out in primitive ops, Q/K/V/O projections (MatMul) with causal
multi-head attention (the mask built from the sequence length with Trilu), a SwiGLU MLP
(gate/up/down MatMuls) and residual Adds; a final RMSNorm and the LM head. No positional
encoding (the weights are random: only the shapes and the graph matter). Input ``input_ids``
int64 ``[B, S]``, output ``logits`` float32 ``[B, S, vocab]``, opset 17.

Weights are generated one initializer at a time and appended to ``OUT.onnx.data`` as they are
made, so writing a 5 GB model needs memory for one weight matrix, not for the model. Each weight
is seeded by (seed, its index): the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
_EPS = 1e-5


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder stack (``hidden`` divisible by ``heads``)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    ffn: int = 128
    vocab: int = 256

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "ffn", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")

    def parameters(self) -> int:
        """Float parameters: embedding and LM head, per layer 4 projections, 3 MLP matrices, 2 norms."""
        h = self.hidden
        per_layer = 4 * h * h + 3 * h * self.ffn + 2 * h
        return 2 * self.vocab * h + self.layers * per_layer + h


def shape_for_bytes(target: int, hidden: int = 2048, vocab: int = 32000) -> DecoderShape:
    """The shape (LLaMA-like ratios: ffn = 2.75 hidden, head dim 64) whose float32 weights come closest to ``target`` bytes."""
    ffn = int(hidden * 2.75) // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((target / 4 - fixed) / per_layer))
    return DecoderShape(layers, hidden, hidden // 64, ffn, vocab)


def parse_size(text: str) -> int:
    """``2.5GB``, ``300MB``, ``1024`` (bytes) -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?)B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 2.5GB or 300MB")
    return int(float(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)])


class _Builder:
    """Nodes and external-data initializers of one model, weights streamed to the data file."""

    def __init__(self, data_path: Path, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._data = open(data_path, "wb")  # noqa: SIM115 - closed by close()
        self._location = data_path.name
        self._seed = seed
        self._count = 0

    def weight(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        rng = np.random.default_rng([self._seed, len(self.initializers)])
        value = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)
        return self._external(name, value)

    def ones(self, name: str, size: int) -> str:
        return self._external(name, np.ones(size, np.float32))

    def _external(self, name: str, value: np.ndarray) -> str:
        offset = self._data.tell()
        raw = value.tobytes()
        self._data.write(raw)
        self._data.write(b"\0" * (-len(raw) % 64))  # 64-byte alignment lets readers memory-map each tensor
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=value.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, val in (("location", self._location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, val
        self.initializers.append(tensor)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(onnx.numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def close(self) -> None:
        self._data.close()


def _rms_norm(b: _Builder, x: str, prefix: str, size: int) -> str:
    square = b.node("Mul", [x, x], f"{prefix}/square")
    mean = b.node("ReduceMean", [square], f"{prefix}/mean", axes=[-1], keepdims=1)
    eps = b.node("Add", [mean, "eps"], f"{prefix}/add_eps")
    root = b.node("Sqrt", [eps], f"{prefix}/sqrt")
    normed = b.node("Div", [x, root], f"{prefix}/div")
    return b.node("Mul", [normed, b.ones(f"{prefix}.weight", size)], f"{prefix}/scale")


def _attention(b: _Builder, x: str, p: str, shape: DecoderShape) -> str:
    h = shape.hidden
    scale = 1 / math.sqrt(h)

    def heads_of(t: str, name: str, perm: list[int]) -> str:
        split = b.node("Reshape", [t, "split_heads"], f"{p}/{name}_split")
        return b.node("Transpose", [split], f"{p}/{name}_heads", perm=perm)

    q = b.node("MatMul", [x, b.weight(f"{p}.q_proj.weight", (h, h), scale)], f"{p}/q_proj")
    k = b.node("MatMul", [x, b.weight(f"{p}.k_proj.weight", (h, h), scale)], f"{p}/k_proj")
    v = b.node("MatMul", [x, b.weight(f"{p}.v_proj.weight", (h, h), scale)], f"{p}/v_proj")
    scores = b.node("MatMul", [heads_of(q, "q", [0, 2, 1, 3]), heads_of(k, "k", [0, 2, 3, 1])], f"{p}/scores")
    scaled = b.node("Mul", [scores, "attn_scale"], f"{p}/scaled")
    masked = b.node("Add", [scaled, "causal_mask"], f"{p}/masked")
    probs = b.node("Softmax", [masked], f"{p}/softmax", axis=-1)
    context = b.node("MatMul", [probs, heads_of(v, "v", [0, 2, 1, 3])], f"{p}/context")
    merged = b.node("Transpose", [context], f"{p}/merge_heads", perm=[0, 2, 1, 3])
    flat = b.node("Reshape", [merged, "merge_shape"], f"{p}/merge")
    return b.node("MatMul", [flat, b.weight(f"{p}.o_proj.weight", (h, h), scale)], f"{p}/o_proj")


def _mlp(b: _Builder, x: str, p: str, shape: DecoderShape) -> str:
    h, f = shape.hidden, shape.ffn
    gate = b.node("MatMul", [x, b.weight(f"{p}.gate_proj.weight", (h, f), 1 / math.sqrt(h))], f"{p}/gate_proj")
    up = b.node("MatMul", [x, b.weight(f"{p}.up_proj.weight", (h, f), 1 / math.sqrt(h))], f"{p}/up_proj")
    sig = b.node("Sigmoid", [gate], f"{p}/sigmoid")
    silu = b.node("Mul", [gate, sig], f"{p}/silu")
    act = b.node("Mul", [silu, up], f"{p}/act")
    return b.node("MatMul", [act, b.weight(f"{p}.down_proj.weight", (f, h), 1 / math.sqrt(f))], f"{p}/down_proj")


def write_decoder(path: Path, shape: DecoderShape, seed: int = 0) -> onnx.ModelProto:
    """Write the decoder to ``path`` (weights in ``path.name + '.data'``); returns the proto (no weight data)."""
    path = Path(path)
    b = _Builder(path.with_name(path.name + ".data"), seed)
    try:
        h, hd = shape.hidden, shape.hidden // shape.heads
        b.const("eps", np.array(_EPS, np.float32))
        b.const("attn_scale", np.array(1 / math.sqrt(hd), np.float32))
        b.const("split_heads", np.array([0, 0, shape.heads, hd], np.int64))
        b.const("merge_shape", np.array([0, 0, h], np.int64))
        b.const("mask_fill", np.array(-1e9, np.float32))
        # causal mask [S, S]: -1e9 strictly above the diagonal, built from the sequence length
        seq = b.node("Shape", ["input_ids"], "seq_len", start=1, end=2)
        square = b.node("Concat", [seq, seq], "mask_shape", axis=0)
        ones = b.node(
            "ConstantOfShape", [square], "mask_ones", value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
        )
        upper = b.node("Trilu", [ones, "one_k"], "mask_upper", upper=1)
        b.const("one_k", np.array(1, np.int64))
        b.node("Mul", [upper, "mask_fill"], "causal_mask")
        x = b.node("Gather", [b.weight("embed_tokens.weight", (shape.vocab, h), 1.0), "input_ids"], "embed")
        for layer in range(shape.layers):
            p = f"layers.{layer}"
            attn = _attention(b, _rms_norm(b, x, f"{p}.input_norm", h), f"{p}.self_attn", shape)
            x = b.node("Add", [x, attn], f"{p}/attn_residual")
            mlp = _mlp(b, _rms_norm(b, x, f"{p}.post_attention_norm", h), f"{p}.mlp", shape)
            x = b.node("Add", [x, mlp], f"{p}/mlp_residual")
        final = _rms_norm(b, x, "norm", h)
        head = b.weight("lm_head.weight", (h, shape.vocab), 1 / math.sqrt(h))
        b.nodes.append(helper.make_node("MatMul", [final, head], ["logits"], name="lm_head"))
    finally:
        b.close()
    graph = helper.make_graph(
        b.nodes,
        "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", shape.vocab])],
        b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="models/decoder.py")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString(deterministic=True))
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path)
    p.add_argument("--size", type=parse_size, help="target weight bytes (e.g. 2.5GB): layers chosen to reach it")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.size is not None:
        shape = shape_for_bytes(args.size)
    else:
        shape = DecoderShape(args.layers, args.hidden, args.heads, args.ffn, args.vocab)
    write_decoder(args.output, shape, args.seed)
    data = args.output.with_name(args.output.name + ".data")
    print(f"wrote {args.output} + {data.name} ({data.stat().st_size / 2**30:.2f} GiB): {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
