"""Writing the two models of one Ascend run from the same :class:`AscendLayer` factors.

* :func:`emit_deploy`: ``AscendQuant -> op(int8 weights, int32 bias) -> AscendDequant(UINT64)``,
  the form ATC reads (custom ops in the default domain; onnxruntime cannot run it).
* :func:`emit_fake_quant`: AMCT's fake-quant form in standard ops, numerically the deploy model:
  ``Mul(1/scale_d) -> Round -> Add(offset_d) -> Clip -> Sub(offset_d)``, integer-valued float
  weights and bias, then ``Mul(deq)`` per output channel (docs/ascend.md, "Fake-quant model").
Identical quantizations of one tensor share one AscendQuant / one fake-quant chain (AMCT's QuantFusion).
A MaxPool reading a quantized tensor reads it through ``AscendAntiQuant`` (AMCT's
MultQuantOptimizer: ATC then runs the pool on the int8 data), in the fake-quant model a
``Mul(scale_d)`` of the fake-quantized integers.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxcomp import ir
from onnxcomp.quant.ascend.layers import AscendLayer
from onnxcomp.quant.ascend.packing import int4_axis, pack_deq_scale, pack_int4


def _quant_key(layer: AscendLayer) -> tuple[str, float, int, str]:
    return (layer.input, float(layer.scale_d), layer.offset_d, layer.act_type)


def _int_limits(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _deq_shape(layer: AscendLayer, out_rank: int) -> tuple[int, ...]:
    """How deq broadcasts over the op's output: per channel on axis 1 of an N-D conv output, else a scalar."""
    if not layer.per_channel:
        return ()
    return (layer.scale_w.size,) + (1,) * max(out_rank - 2, 0)


def _nodes_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    return {n.name: n for n in graph.nodes}


def _tensor(graph: ir.Graph, name: str) -> ir.Tensor:
    return graph.tensors()[name]


#: Float readers of a quantized tensor that read its quantized value (AMCT's MultQuantOptimizer).
ANTIQUANT_READERS = ("MaxPool",)


def _antiquant_readers(x: ir.Tensor, done: set[str]) -> list[ir.Node]:
    """The MaxPools reading ``x`` (once per tensor: a second quantization of it changes nothing for them)."""
    if x.name in done:
        return []
    done.add(x.name)
    return [n for n in ir.consumers(x) if n.op in ANTIQUANT_READERS]


def _reroute(reader: ir.Node, old: ir.Tensor, new: ir.Tensor) -> None:
    for i, tensor in enumerate(list(reader.inputs)):
        if tensor is old:
            reader.inputs[i] = new


def _has_bias(node: ir.Node) -> bool:
    return len(node.inputs) > 2 and bool(node.inputs[2].name)


def _bias_name(graph: ir.Graph, node: ir.Node, suffix: str) -> str:
    """``<bias>.quant``, or ``<layer>.bias.quant`` for a bias that bias correction created."""
    return ir.unique_name(graph, f"{node.inputs[2].name if _has_bias(node) else node.name + '.bias'}{suffix}")


def _set_bias(graph: ir.Graph, node: ir.Node, bias: ir.Tensor) -> None:
    """Input 2 of Conv / ConvTranspose / Gemm (appended when the float layer had none)."""
    if len(node.inputs) > 2:
        node.inputs[2] = bias
    else:
        node.inputs.append(bias)


def _integer_output(
    graph: ir.Graph, nodes: dict[str, ir.Node], layer: AscendLayer, dtype: type[np.generic], suffix: str
) -> tuple[ir.Tensor, ir.Tensor]:
    """(the float tensor the dequantization writes, the integer tensor it reads).

    The op writes ``<layer>.int_out``; with a bias Add folded in, the Add reads it and the int32
    bias (``<layer>.bias_out``, docs/ascend.md: AscendDequant after the Add).
    """
    node = nodes[layer.node]
    out = node.outputs[0]
    acc = ir.make_variable(graph, f"{layer.node}.int_out", dtype=dtype)
    node.outputs[0] = acc
    if layer.bias_add is None:
        return out, acc
    assert layer.bias is not None
    add = nodes[layer.bias_add]
    k = 1 if add.inputs[0] is out else 0  # the bias constant's index
    add.inputs[1 - k] = acc
    add.inputs[k] = ir.make_constant(ir.unique_name(graph, f"{add.inputs[k].name}{suffix}"), layer.bias.astype(dtype))
    out = add.outputs[0]
    summed = ir.make_variable(graph, f"{layer.node}.bias_out", dtype=dtype)
    add.outputs[0] = summed
    return out, summed


def emit_fake_quant(graph: ir.Graph, layers: list[AscendLayer]) -> None:
    """Rewrite ``graph`` (standard ops, runs on onnxruntime) into AMCT's fake-quant form."""
    nodes = _nodes_by_name(graph)
    shared: dict[tuple[str, float, int, str], ir.Tensor] = {}
    antiquanted: set[str] = set()
    for layer in layers:
        node = nodes[layer.node]
        key = _quant_key(layer)
        if key not in shared:
            x = _tensor(graph, layer.input)
            readers = _antiquant_readers(x, antiquanted)
            lo, hi = _int_limits(layer.bits)
            base = f"{layer.node}.quant"

            def const(suffix: str, value: np.ndarray, base: str = base) -> ir.Tensor:
                return ir.make_constant(ir.unique_name(graph, f"{base}.{suffix}"), value)

            def step(op: str, inputs: list[ir.Tensor], suffix: str, base: str = base) -> ir.Tensor:
                out = ir.make_variable(graph, f"{base}.{suffix}", dtype=np.float32)
                ir.make_node(graph, op, inputs, [out], name=f"{base}.{suffix}")
                return out

            offset = const("offset", np.array(layer.offset_d, np.float32))
            scaled = step("Mul", [x, const("scale", np.array(layer.quant_scale, np.float32))], "mul")
            rounded = step("Round", [scaled], "round")
            shifted = step("Add", [rounded, offset], "add")
            limits = [const("min", np.array(lo, np.float32)), const("max", np.array(hi, np.float32))]
            clipped = step("Clip", [shifted, *limits], "clip")
            shared[key] = step("Sub", [clipped, offset], "sub")
            if readers:
                restored = ir.make_variable(graph, f"{layer.node}.antiquant.out", dtype=np.float32)
                scale_d = const("antiquant_scale", np.array(layer.scale_d, np.float32))
                ir.make_node(graph, "Mul", [shared[key], scale_d], [restored], name=f"{layer.node}.antiquant")
                for reader in readers:
                    _reroute(reader, x, restored)
        node.inputs[0] = shared[key]
        if layer.op != "AveragePool":  # the one op without a weight
            ir.replace_constant(graph, node, 1, layer.codes.astype(np.float32), ".fake_quant")
        if layer.bias is not None and layer.bias_add is None:
            _set_bias(
                graph, node, ir.make_constant(_bias_name(graph, node, ".fake_quant"), layer.bias.astype(np.float32))
            )
        out, acc = _integer_output(graph, nodes, layer, np.float32, ".fake_quant")
        deq = ir.make_constant(
            ir.unique_name(graph, f"{layer.node}.dequant.scale"),
            layer.deq.reshape(_deq_shape(layer, layer.codes.ndim)) if layer.per_channel else layer.deq.reshape(()),
        )
        ir.make_node(graph, "Mul", [acc, deq], [out], name=f"{layer.node}.dequant")


def emit_deploy(graph: ir.Graph, layers: list[AscendLayer]) -> None:
    """Rewrite ``graph`` into the deploy form ATC reads (docs/ascend.md, "Nodes")."""
    nodes = _nodes_by_name(graph)
    shared: dict[tuple[str, float, int, str], ir.Tensor] = {}
    antiquanted: set[str] = set()
    for layer in layers:
        node = nodes[layer.node]
        key = _quant_key(layer)
        storage = np.int16 if layer.act_type == "INT16" else np.int8
        if key not in shared:
            x = _tensor(graph, layer.input)
            readers = _antiquant_readers(x, antiquanted)
            q = ir.make_variable(graph, f"{layer.node}.quant.out", dtype=storage)
            attrs = {
                "scale": float(layer.quant_scale),
                "offset": float(layer.offset_d),
                "dst_type": layer.act_type,  # INT4 weights keep INT8 activations (W4A8; docs/ascend.md)
            }
            ir.make_node(graph, "AscendQuant", [x], [q], name=f"{layer.node}.quant", attrs=attrs)
            shared[key] = q
            if readers:
                restored = ir.make_variable(graph, f"{layer.node}.antiquant.out", dtype=np.float32)
                anti = {"scale": float(layer.scale_d), "offset": float(layer.offset_d), "dst_type": layer.act_type}
                ir.make_node(graph, "AscendAntiQuant", [q], [restored], name=f"{layer.node}.antiquant", attrs=anti)
                for reader in readers:
                    _reroute(reader, x, restored)
        node.inputs[0] = shared[key]
        if layer.op == "AveragePool":  # the mean of the codes is no integer (UNVERIFIED, docs/ascend.md)
            out, acc = _integer_output(graph, nodes, layer, np.float32, ".quant")
            param = ir.make_constant(ir.unique_name(graph, f"{layer.node}.dequant.param"), pack_deq_scale(layer.deq))
            ir.make_node(graph, "AscendDequant", [acc, param], [out], name=f"{layer.node}.dequant", attrs={"dtype": 0})
            continue
        codes = layer.codes
        if layer.wts_type == "INT4":
            codes = pack_int4(codes, int4_axis(layer.op, bool(node.attrs.get("transB", 0))))
        ir.replace_constant(graph, node, 1, codes.astype(np.int8), ".quant")
        if layer.bias is not None and layer.bias_add is None:
            bias = ir.make_constant(_bias_name(graph, node, ".quant"), layer.bias)
            if layer.wts_type == "INT4":  # AMCT's bias_quant Cast between the int32 bias and an INT4 op
                cast = ir.make_variable(graph, f"{layer.node}.bias_quant.out", dtype=np.float32)
                ir.make_node(
                    graph, "Cast", [bias], [cast], name=f"{layer.node}.bias_quant", attrs={"to": onnx.TensorProto.FLOAT}
                )
                _set_bias(graph, node, cast)
            else:
                _set_bias(graph, node, bias)
        out, acc = _integer_output(graph, nodes, layer, np.int32, ".quant")
        param = ir.make_constant(ir.unique_name(graph, f"{layer.node}.dequant.param"), pack_deq_scale(layer.deq))
        ir.make_node(graph, "AscendDequant", [acc, param], [out], name=f"{layer.node}.dequant", attrs={"dtype": 0})
