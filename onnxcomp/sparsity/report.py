"""Before/after figures of a sparsified model: parameters, MACs, serialized size, sparsity per layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.analysis.inspect import human_bytes, human_count, summarize
from onnxcomp.analysis.macs import with_input_shapes
from onnxcomp.framework.base import PassResult

Shapes = Mapping[str, Sequence[int]]


def nonzero_weights(model: onnx.ModelProto) -> int:
    """Non-zero values in the model's float initializers (what n:m sparsity reduces)."""
    count = 0
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            count += int(np.count_nonzero(ir.tensor_values(init)))
    return count


def model_figures(model: onnx.ModelProto, input_shapes: Shapes | None = None) -> dict[str, int | None]:
    """Parameters (values in constants), non-zero float weights, MACs (batch 1, or at ``input_shapes``), bytes."""
    s = summarize(with_input_shapes(model, input_shapes) if input_shapes else model)
    return {"params": s.param_count, "nonzero": nonzero_weights(model), "macs": s.macs_total, "bytes": model.ByteSize()}


#: What n:m zeros change on onnxruntime's CPU provider (docs/onnxruntime.md): nothing, by themselves.
NM_ON_ORT = (
    "note: onnxruntime's CPU provider has no n:m sparse kernel, so the zeros change neither the file size "
    "nor the latency there; they pay off compressed (zip/zstd), with --quantize (the zeros stay exact), "
    "or on hardware with structured-sparse kernels"
)


def compare_models(
    before: onnx.ModelProto, after: onnx.ModelProto, input_shapes: Shapes | None = None
) -> dict[str, dict[str, int | None]]:
    """``{"params"|"macs"|"bytes": {"before", "after"}}``."""
    b, a = model_figures(before, input_shapes), model_figures(after, input_shapes)
    return {key: {"before": b[key], "after": a[key]} for key in b}


def format_compare(figures: dict[str, dict[str, int | None]]) -> list[str]:
    """Text rows: ``parameters  127.26k -> 71.93k (-43.5%)`` for each figure."""
    rows = []
    for key, label, fmt in (
        ("params", "parameters", human_count),
        ("nonzero", "non-zero weights", human_count),
        ("macs", "MACs (batch 1)", human_count),
        ("bytes", "size", human_bytes),
    ):
        b, a = figures[key]["before"], figures[key]["after"]
        if b is None or a is None:
            rows.append(f"{label:<16} unknown")
            continue
        change = f" ({(a - b) / b:+.1%})" if b else ""
        rows.append(f"{label:<16} {fmt(b):>10} -> {fmt(a):>10}{change}")
    return rows


def format_layers(name: str, result: PassResult) -> list[str]:
    """Per-layer rows of a sparsity pass result (channels before/after, n:m coverage, refit errors)."""
    rows: list[str] = []
    for entry in result.data.get("layers", []):
        if entry["kind"] == "channels":
            refit = [s for s in entry["sinks"] if "error_refit" in s]
            fit = ""
            if refit:
                before = sum(s["error_pruned"] for s in refit) / len(refit)
                after = sum(s["error_refit"] for s in refit) / len(refit)
                fit = f", consumers' output error {before:.2%} -> {after:.2%} refit"
            rows.append(f"{entry['node']}: {entry['channels_before']} -> {entry['channels_after']} channels{fit}")
        else:
            rows.append(
                f"{entry['node']}: {entry['pattern']} on {entry['pattern_fraction']:.1%} of groups, "
                f"{entry['zero_fraction']:.1%} zeros"
            )
    return rows


def pattern_coverage(result: PassResult) -> float | None:
    """Fraction of n:m groups satisfying the pattern over the sparsified layers (None: no layer)."""
    stats: dict[str, Any] = result.stats
    groups = stats.get("groups", 0)
    return stats.get("groups_ok", 0) / groups if groups else None


#: onnxruntime's x86 convs use an NCHWc layout with blocks of this many channels (AVX-512).
ORT_CHANNEL_BLOCK = 16


def alignment_hint(result: PassResult) -> str | None:
    """A hint when pruning took convs off a multiple of onnxruntime's NCHWc channel block."""
    odd = sorted(
        {
            e["node"]
            for e in result.data.get("layers", [])
            if e["kind"] == "channels"
            and e["op"] == "Conv"
            and e["channels_before"] % ORT_CHANNEL_BLOCK == 0
            and e["channels_after"] % ORT_CHANNEL_BLOCK
        }
    )
    if not odd:
        return None
    shown = ", ".join(odd[:4]) + (", ..." if len(odd) > 4 else "")
    return (
        f"hint: {len(odd)} pruned conv(s) ({shown}) keep a channel count that is not a multiple of "
        f"{ORT_CHANNEL_BLOCK} any more; onnxruntime may run them outside its blocked (NCHWc) layout, "
        "slower per MAC. "
        f"--round-to {ORT_CHANNEL_BLOCK} keeps the layout"
    )
