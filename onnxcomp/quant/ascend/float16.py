"""float16 models for ``--target ascend``: computed in float32 inside, float16 at the model's edges.

ATC takes float32 models, and onnxcomp calibrates and quantizes float32 layers. A model whose
inputs, outputs or initializers are float16 is rewritten before planning: every float16
initializer, ``Constant`` and ``ConstantOfShape`` value becomes float32, every ``Cast`` to
float16 a Cast to float32, and each float16 graph input / output keeps its name and type through
a ``Cast`` at the edge (``<input>.float32`` is what the layers read; ``<output>.float32`` is
what they write). The user's float16 calibration data and every consumer of the model see the
same interface. AMCT's own float16 form (AscendQuant reading float16, AscendDequant ``dtype`` 1)
is not written (docs/ascend.md). A float16 type this rewrite does not know (another op's dtype
attribute) declines the model with the reason instead of leaving a mixed-precision graph.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.ir.mapped import tensor_values

FLOAT16 = TensorProto.FLOAT16
#: Attributes that name an output element type, by op: a float16 one cannot be rewritten here.
_DTYPE_ATTRS = {"dtype", "to"}


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _is_float16(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type") and value.type.tensor_type.elem_type == FLOAT16


def is_float16_model(model: onnx.ModelProto) -> bool:
    """Does the model compute in float16 (a float16 graph input, output or initializer)?"""
    graph = model.graph
    return any(_is_float16(v) for v in [*graph.input, *graph.output]) or any(
        t.data_type == FLOAT16 for g in _graphs(graph) for t in g.initializer
    )


def _to_float32(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == FLOAT16:
        tensor.CopyFrom(numpy_helper.from_array(tensor_values(tensor).astype(np.float32), tensor.name))


def _rewrite_graph(graph: onnx.GraphProto) -> str | None:
    """float16 -> float32 inside one graph (I/O excluded); why not, or None."""
    for tensor in graph.initializer:
        _to_float32(tensor)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _to_float32(attr.t)
            elif attr.name in _DTYPE_ATTRS and attr.type == onnx.AttributeProto.INT and attr.i == FLOAT16:
                if node.op_type != "Cast":
                    return f"{node.op_type} {node.name!r} makes float16 values (attribute {attr.name})"
                attr.i = TensorProto.FLOAT
    for value in graph.value_info:
        if _is_float16(value):
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return None


def float16_to_float32(model: onnx.ModelProto) -> onnx.ModelProto | str:
    """A copy of ``model`` computing in float32 with its float16 inputs and outputs kept; or why not."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for g in _graphs(graph):
        why = _rewrite_graph(g)
        if why is not None:
            return f"float16 model: {why}; convert it to float32 first"
    taken = {o for n in graph.node for o in n.output} | {v.name for v in [*graph.input, *graph.initializer]}

    def fresh(base: str) -> str:
        name, n = base, 1
        while name in taken:
            name, n = f"{base}.{n}", n + 1
        taken.add(name)
        return name

    edges = []
    for value in graph.input:
        if _is_float16(value):
            inner = fresh(f"{value.name}.float32")
            for g in _graphs(graph):
                for node in g.node:
                    node.input[:] = [inner if i == value.name else i for i in node.input]
            edges.append(helper.make_node("Cast", [value.name], [inner], name=fresh(f"{value.name}.to_float32"), to=1))
    tail = []
    for value in graph.output:
        if _is_float16(value):
            inner = fresh(f"{value.name}.float32")
            for node in graph.node:
                node.output[:] = [inner if o == value.name else o for o in node.output]
            for g in _graphs(graph):
                for node in g.node:
                    node.input[:] = [inner if i == value.name else i for i in node.input]
            tail.append(
                helper.make_node("Cast", [inner], [value.name], name=fresh(f"{value.name}.to_float16"), to=FLOAT16)
            )
    nodes = [*edges, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    return copy
