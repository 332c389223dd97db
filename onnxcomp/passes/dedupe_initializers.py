"""dedupe_initializers: merge constant initializers with identical dtype, shape and bytes."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from onnxcomp import ir
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass

log = logging.getLogger(__name__)

#: bits per element of the ml_dtypes types stored packed (numpy holds them one per byte).
_PACKED_BITS = {"int4": 4, "uint4": 4, "float4_e2m1fn": 4, "int2": 2, "uint2": 2}


def storage_bytes(array: np.ndarray) -> int:
    """Bytes ``array`` takes in an ONNX initializer (sub-byte types packed)."""
    bits = _PACKED_BITS.get(array.dtype.name, array.dtype.itemsize * 8)
    return (array.size * bits + 7) // 8


def _initializers(graph: ir.Graph) -> list[ir.Constant]:
    """Initializers read by main-graph nodes, by name; graph inputs/outputs are left out."""
    io = {id(t) for t in [*graph.inputs, *graph.outputs]}
    found: dict[str, ir.Constant] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, ir.Constant) and id(tensor) not in io:
                found.setdefault(tensor.name, tensor)
    return [found[name] for name in sorted(found)]


#: Weights above this are told apart by a sample of their bytes; only equal samples are compared.
_SAMPLED_FROM = 1 << 20
_SAMPLE = 1 << 16
_COMPARE_CHUNK = 1 << 24


def _bytes_of(value: np.ndarray | None) -> np.ndarray:
    """The stored bytes of a numeric initializer as a flat uint8 array (no copy when contiguous)."""
    assert value is not None
    return np.ascontiguousarray(value).reshape(-1).view(np.uint8)


def _fingerprint(value: np.ndarray | None) -> bytes:
    """A digest equal for equal weights: of all the bytes up to ``_SAMPLED_FROM``, above it of the
    first and last 64 KiB and 64 Ki bytes spread over the rest (no weight-sized hash or copy)."""
    assert value is not None
    if value.dtype.kind == "O":  # strings: their text, not the object pointers
        return hashlib.sha256(repr(value.tolist()).encode()).digest()
    raw = _bytes_of(value)
    digest = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    parts = [raw] if raw.size <= _SAMPLED_FROM else [raw[:_SAMPLE], raw[-_SAMPLE:], raw[:: raw.size // _SAMPLE]]
    for part in parts:
        digest.update(np.ascontiguousarray(part).data)
    return digest.digest()


def _same_bytes(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two initializers of one dtype and shape hold the same bytes (compared in chunks)."""
    assert a is not None and b is not None
    if a.dtype.kind == "O":
        return bool(a.tolist() == b.tolist())
    x, y = _bytes_of(a), _bytes_of(b)
    return x.size == y.size and all(
        np.array_equal(x[i : i + _COMPARE_CHUNK], y[i : i + _COMPARE_CHUNK]) for i in range(0, x.size, _COMPARE_CHUNK)
    )


def _rewire(duplicate: ir.Constant, keep: ir.Constant) -> None:
    for user in list(duplicate.outputs):
        for i, tensor in enumerate(user.inputs):
            if tensor is duplicate:
                user.inputs[i] = keep


@register_pass
class DedupeInitializers(Pass):
    """Merge initializers that have the same dtype, shape and bytes into one.

    Of each group the initializer first in name order is kept and the readers of the others are
    rewired to it (subgraph readers included). Reports the number merged and the bytes saved
    (``stats["bytes_saved"]``, also in ``data``). Leaves alone initializers that are graph inputs
    or outputs (their names are part of the interface), ``Constant`` nodes, and initializers
    smaller than ``min_bytes``. Bytes are compared exactly, so ``0.0`` and ``-0.0`` differ and
    NaNs with the same bits match; only weights whose fingerprints (over 1 MiB: of a sample of
    their bytes) agree are compared, so a model without duplicates is not hashed whole.
    """

    name = "dedupe_initializers"

    @dataclass(frozen=True)
    class Options:
        min_bytes: int = 0  # leave initializers smaller than this alone

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"merged": 0, "bytes_saved": 0})
        by_layout: dict[tuple[str, tuple[int, ...]], list[ir.Constant]] = {}
        for tensor in _initializers(graph):
            by_layout.setdefault((str(tensor.dtype), tuple(tensor.shape)), []).append(tensor)
        for group in by_layout.values():
            if len(group) < 2:
                continue
            kept: dict[bytes, list[ir.Constant]] = {}  # by fingerprint: the distinct weights kept so far
            for tensor in group:
                value = ir.constant_value(tensor)
                assert value is not None  # an initializer
                nbytes = storage_bytes(value)
                if nbytes < self.options.min_bytes:
                    continue
                candidates = kept.setdefault(_fingerprint(value), [])
                keep = next((k for k in candidates if _same_bytes(ir.constant_value(k), value)), None)
                if keep is None:
                    candidates.append(tensor)
                    continue
                _rewire(tensor, keep)
                result.stats["merged"] += 1
                result.stats["bytes_saved"] += nbytes
                result.changed.append(f"{tensor.name} -> {keep.name}")
                log.debug("dedupe_initializers: %s -> %s (%d bytes)", tensor.name, keep.name, nbytes)
        result.modified = result.stats["merged"] > 0
        result.data["bytes_saved"] = result.stats["bytes_saved"]
        return result
