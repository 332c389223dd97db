"""Does a record reproduce its deploy model? Every quantized node, walked in both.

From each record entry alone: AscendQuant ``scale`` = float32(1 / scale_d) and ``offset`` =
offset_d, an AscendAntiQuant's ``scale`` = scale_d and ``offset`` = offset_d, AscendDequant's
UINT64 parameter = pack(float32(scale_d * scale_w[c])), one weight scale per output channel,
int8 weights and int32 bias (input 2, or the constant of a MatMul's bias Add that the
AscendDequant reads); and every AscendDequant of the deploy model has an entry. Used by the
tests and ``onnxcomp verify-ascend``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxcomp.ir.mapped import tensor_values
from onnxcomp.quant.ascend.layers import quant_scale
from onnxcomp.quant.ascend.packing import deq_scale, pack_deq_scale


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _f32_bits(value: float | np.floating) -> int:
    return int(np.array(value, np.float32).view(np.uint32))


def record_mismatches(deploy: onnx.ModelProto, entries: dict[str, Any]) -> list[str]:
    """One line per disagreement between ``deploy`` and the parsed record (``record.parse_record``); [] if none."""
    graph = deploy.graph
    nodes = {n.name: n for n in graph.node}
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    problems: list[str] = []
    dequant_layers = {n.name[: -len(".dequant")] for n in graph.node if n.op_type == "AscendDequant"}
    for layer in sorted(dequant_layers - set(entries)):
        problems.append(f"{layer}: AscendDequant {layer}.dequant has no record entry")
    for layer, value in entries.items():
        node = nodes.get(layer)
        if node is None:
            problems.append(f"{layer}: in the record but not a node of the deploy model")
            continue
        quant = producers.get(node.input[0])
        while quant is not None and quant.op_type != "AscendQuant" and quant.input:
            quant = producers.get(quant.input[0])  # an AscendQuant shared with another layer keeps that one's name
        if quant is None:
            problems.append(f"{layer}: its input does not come from an AscendQuant")
            continue
        if _f32_bits(_attr(quant, "scale")) != _f32_bits(quant_scale(value.scale_d)):
            problems.append(f"{layer}: AscendQuant scale {_attr(quant, 'scale')!r} != 1 / scale_d {value.scale_d!r}")
        if _attr(quant, "offset") != value.offset_d:
            problems.append(f"{layer}: AscendQuant offset {_attr(quant, 'offset')!r} != offset_d {value.offset_d}")
        dst = _attr(quant, "dst_type")
        if (dst.decode() if isinstance(dst, bytes) else dst) != value.dst_type:
            problems.append(f"{layer}: AscendQuant dst_type {dst!r} != the record's {value.dst_type!r}")
        anti = nodes.get(f"{layer}.antiquant")
        if anti is not None and (
            anti.input[0] != quant.output[0]
            or _f32_bits(_attr(anti, "scale")) != _f32_bits(value.scale_d)
            or _attr(anti, "offset") != value.offset_d
        ):
            problems.append(f"{layer}: AscendAntiQuant {anti.name} does not undo the layer's AscendQuant")
        dequant = nodes.get(f"{layer}.dequant")
        source = producers.get(dequant.input[0]) if dequant is not None and dequant.input else None
        bias_add = source if source is not None and source.op_type == "Add" and node.output[0] in source.input else None
        if dequant is None or dequant.op_type != "AscendDequant" or (source is not node and bias_add is None):
            problems.append(f"{layer}: no AscendDequant {layer}.dequant reading its output (or its bias Add's)")
            continue
        param = tensor_values(inits[dequant.input[1]]) if dequant.input[1] in inits else None
        scale_w = np.array(value.scale_w, np.float32)
        mode_s19 = value.fakequant_precision_mode == "FORCE_FP16_QUANT"
        expected = pack_deq_scale(deq_scale(np.float32(value.scale_d), scale_w, mode_s19))
        if param is None or param.dtype != np.uint64 or not np.array_equal(param.reshape(-1), expected):
            problems.append(f"{layer}: AscendDequant parameter != pack(scale_d * scale_w) of the record")
        if node.op_type == "AveragePool":  # no weight, no bias: scale_w is 1
            if scale_w.size != 1 or scale_w[0] != 1:
                problems.append(f"{layer}: an AveragePool's record needs scale_w = [1]")
            continue
        weight = tensor_values(inits[node.input[1]]) if node.input[1] in inits else None
        if weight is None or weight.dtype != np.int8:
            problems.append(f"{layer}: weight is not an int8 initializer")
        elif scale_w.size > 1 and node.op_type in ("Conv", "ConvTranspose"):
            channels = weight.shape[0 if node.op_type == "Conv" else 1]
            if channels != scale_w.size:
                problems.append(f"{layer}: {scale_w.size} weight scales for {channels} output channels")
        if bias_add is not None:
            bias = inits.get(next((i for i in bias_add.input if i != node.output[0]), ""))
            if bias is None or tensor_values(bias).dtype != np.int32:
                problems.append(f"{layer}: the bias of {bias_add.name} is not an int32 initializer")
        if len(node.input) > 2 and node.input[2]:
            bias_name = node.input[2]
            cast = producers.get(bias_name)
            if cast is not None and cast.op_type == "Cast":
                bias_name = cast.input[0]
            bias = inits.get(bias_name)
            if bias is None or tensor_values(bias).dtype != np.int32:
                problems.append(f"{layer}: bias is not an int32 initializer")
    return problems
