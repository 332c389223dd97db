"""Bias correction for ``--target ascend``: each layer's mean output error moved into its int32 bias.

The quantizer's own bias correction (:mod:`onnxcomp.quant.bias_correction`) edits a Q/DQ graph;
here the bias is an int32 code vector of the layer (``bias_q = round(b / deq[c])``), so the
correction happens before either model is written: per output channel ``e_c = E[y_q,c] -
E[y_f,c]`` is measured on the fake-quant model (which onnxruntime runs, and whose integer path is
the deploy model's), and the codes become ``round(bias_q - e / deq[c])``. Both models and the
record are then written from the corrected factors, so they stay equal.

``full`` corrects level by level (a layer is measured with every upstream layer already
corrected); ``fast`` measures every layer in one pass against a float *shadow* of it reading the
same fake-quantized-model input. A Conv / ConvTranspose / Gemm without a bias gets one (an INT32
bias is what ATC's integer op takes anyway); a MatMul's bias is the int32 constant of the bias
Add folded into its integer path; a MatMul without one is left as it is, with that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.calibration.collect import Calibrator
from onnxcomp.calibration.moments import ChannelMean
from onnxcomp.quant.ascend.emit import emit_fake_quant
from onnxcomp.quant.ascend.layers import AscendLayer, bias_codes
from onnxcomp.quant.bias_correction import Target, levels

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


def channel_axis(op: str) -> int:
    """The channel axis of a layer's output: 1 for convs (N, C, ...), last for Gemm / MatMul."""
    return 1 if op in ("Conv", "ConvTranspose") else -1


def output_means(outputs: list[tuple[str, str]]) -> dict[str, Callable[[], ChannelMean]]:
    """Channel-mean collectors of the float layers' (output tensor, op), for the pipeline's one calibration pass."""
    return {tensor: partial(ChannelMean, channel_axis(op)) for tensor, op in outputs}


def _measured(nodes: Mapping[str, ir.Node], layer: AscendLayer) -> str:
    """The layer's output in both models: its own, or that of the bias Add folded into it."""
    return str(nodes[layer.bias_add if layer.bias_add is not None else layer.node].outputs[0].name)


def _fake_quant_model(
    float_model: onnx.ModelProto, layers: list[AscendLayer], shadowed: list[AscendLayer]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The fake-quant model of ``layers``, each of ``shadowed`` with a float twin on the same input as an output.

    Returns the model and layer name -> its twin's output tensor.
    """
    graph = ir.import_model(float_model)
    nodes = {n.name: n for n in graph.nodes}
    shadows: dict[str, str] = {}
    for layer in shadowed:
        node = nodes[layer.node]
        out = ir.make_variable(graph, f"{node.outputs[0].name}.shadow", dtype=np.float32)
        ir.make_node(graph, node.op, list(node.inputs), [out], f"{node.name}.shadow", dict(node.attrs))
        graph.outputs.append(out)
        shadows[layer.node] = out.name
    emit_fake_quant(graph, layers)
    ir.finalize(graph)
    return ir.export_model(graph, float_model), shadows


def _apply(layer: AscendLayer, error: np.ndarray) -> dict[str, Any]:
    """Shift the layer's int32 bias by -error / deq; what was done, for the record."""
    summary: dict[str, Any] = {
        "max_abs_error": float(np.max(np.abs(error))),
        "mean_abs_error": float(np.mean(np.abs(error))),
    }
    channels = error.size
    current = np.zeros(channels) if layer.bias is None else layer.bias.astype(np.float64)
    deq = np.broadcast_to(layer.deq.astype(np.float64), (channels,))
    codes = bias_codes(current * deq - error.astype(np.float64), layer.deq, channels)
    if isinstance(codes, str):
        return {**summary, "skipped": codes}
    summary["site"] = "new int32 bias" if layer.bias is None else "int32 bias" if layer.bias_add is None else "bias Add"
    layer.bias = codes
    return summary


def correct_biases(
    graph: ir.Graph,
    float_model: onnx.ModelProto,
    layers: list[AscendLayer],
    float_means: Mapping[str, Any],  # output tensor -> filled ChannelMean
    batches: Batches,
    variant: str,
    max_batches: int | None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Correct the biases of ``layers`` (in place) against the float model's channel means; node -> what was done.

    ``graph`` is the float graph the layers were planned on (topologically sorted: it orders the levels).
    """
    nodes = {n.name: n for n in graph.nodes}
    done: dict[str, dict[str, Any]] = {}
    eligible = []
    for layer in layers:
        if layer.op == "AveragePool":
            done[layer.node] = {"skipped": "an AveragePool has no bias"}
        elif layer.op == "MatMul" and layer.bias_add is None:
            done[layer.node] = {"skipped": "a MatMul without a bias Add has no bias in the Ascend deploy form"}
        else:
            eligible.append(layer)
    outputs = {layer.node: _measured(nodes, layer) for layer in eligible}
    if variant == "fast":
        model, shadows = _fake_quant_model(float_model, layers, eligible)
        factories: dict[str, Callable[[], ChannelMean]] = {}
        for layer in eligible:
            for name in (outputs[layer.node], shadows[layer.node]):
                factories[name] = partial(ChannelMean, channel_axis(layer.op))
        means = Calibrator(model, factories).run(batches(), max_batches=max_batches, progress=progress)
        for layer in eligible:
            error = means[outputs[layer.node]].mean() - means[shadows[layer.node]].mean()
            done[layer.node] = {"variant": "fast", "level": 0, **_apply(layer, error)}
        return done
    ir.finalize(graph)
    by_node = {layer.node: layer for layer in eligible}
    targets = [Target(nodes[layer.node], layer.op, outputs[layer.node], {}) for layer in eligible]
    for level, group in enumerate(levels(graph, targets)):
        model, _ = _fake_quant_model(float_model, layers, [])
        factories = {t.tensor: partial(ChannelMean, channel_axis(t.op)) for t in group}
        means = Calibrator(model, factories).run(batches(), max_batches=max_batches, progress=progress)
        for t in group:
            error = means[t.tensor].mean() - float_means[t.tensor].mean()
            done[t.node.name] = {"variant": "full", "level": level, **_apply(by_node[t.node.name], error)}
    return done
