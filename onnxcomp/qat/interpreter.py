"""An ONNX graph run by torch: a ``torch.nn.Module`` whose parameters are the model's weights.

The module walks the graph's nodes in their (topological) order with one torch function per op
(:mod:`onnxcomp.qat.ops`), so autograd reaches every weight. The weights of Conv, ConvTranspose,
Gemm and MatMul (and a BatchNormalization's scale and bias) are ``nn.Parameter``; every other
constant is a buffer. Two hooks let quantization-aware training change what the graph computes
without touching it: ``weight_view`` (the value a node reads for a parameter: fake-quantized,
masked) and ``tensor_view`` (what readers of a tensor see: a fake-quantized activation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx

from onnxcomp.errors import ModelLoadError
from onnxcomp.ir.mapped import tensor_values
from onnxcomp.qat.engine import torch
from onnxcomp.qat.ops import OPS
from onnxcomp.qat.ops_spatial import SPATIAL_OPS

#: Inputs of these ops that are weights (trained), when they are constants.
WEIGHT_INPUTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
}


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


assert all(name in OPS for name in SPATIAL_OPS)


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types of the main graph the interpreter has no function for (subgraph ops included)."""
    missing = set()
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            missing.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
    return sorted(missing)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        out[a.name] = tensor_values(value) if isinstance(value, onnx.TensorProto) else value
    out["_outputs"] = len(node.output)
    return out


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    if "value" in a:
        return tensor_values(a["value"])
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in a:
            return np.asarray(list(a[key]), dtype)
    raise ModelLoadError(f"Constant node {node.name!r}: unsupported value attribute {sorted(a)}")


class GraphModule(torch.nn.Module):
    """``forward({input name: tensor})`` -> ``{output name: tensor}``, as onnxruntime computes it."""

    def __init__(self, model: onnx.ModelProto, where: str = "model") -> None:
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise ModelLoadError(
                f"{where}: ops the training interpreter does not implement: {', '.join(missing)} "
                "(quantization-aware training supports the ops listed in docs/qat.md)"
            )
        graph = model.graph
        self.opset = default_opset(model)
        self.input_names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        self.output_names = [o.name for o in graph.output]
        constants = {t.name: tensor_values(t) for t in graph.initializer}
        self.nodes: list[tuple[onnx.NodeProto, dict[str, Any]]] = []
        for node in graph.node:
            if node.op_type == "Constant":
                constants[node.output[0]] = _constant_node_value(node)
            else:
                self.nodes.append((node, _attrs(node)))
        trainable = {
            node.input[i]
            for node, _ in self.nodes
            for i in WEIGHT_INPUTS.get(node.op_type, ())
            if i < len(node.input) and node.input[i] in constants and constants[node.input[i]].dtype == np.float32
        }
        #: ONNX tensor name -> key in ``weights`` / ``buffers_by_name`` (torch names cannot hold every ONNX name)
        self.weight_keys: dict[str, str] = {}
        self.weights = torch.nn.ParameterDict()
        self.constant_keys: dict[str, str] = {}
        for i, (name, value) in enumerate(sorted(constants.items())):
            tensor = torch.from_numpy(np.array(value, copy=True))
            if name in trainable:
                self.weight_keys[name] = f"w{i}"
                self.weights[f"w{i}"] = torch.nn.Parameter(tensor)
            else:
                self.constant_keys[name] = f"c{i}"
                self.register_buffer(f"c{i}", tensor, persistent=True)
        self.weight_view: Callable[[str, torch.Tensor], torch.Tensor] | None = None
        self.tensor_view: Callable[[str, torch.Tensor], torch.Tensor] | None = None
        #: (node name, its input 0) -> what the node reads: run-time (per-token) activation quantization
        self.input_view: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def weight(self, name: str) -> torch.nn.Parameter:
        """The parameter holding ONNX initializer ``name``."""
        return self.weights[self.weight_keys[name]]

    def forward(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        for name in self.input_names:
            if name not in feeds:
                raise KeyError(f"missing model input {name!r}; the model reads {self.input_names}")
            value = feeds[name]
            env[name] = self._seen(name, value if isinstance(value, torch.Tensor) else torch.from_numpy(value))
        for node, attrs in self.nodes:
            inputs = [self._value(name, env) if name else None for name in node.input]
            if self.input_view is not None and inputs and inputs[0] is not None:  # per-node quantization of input 0
                inputs[0] = self.input_view(node.name, inputs[0])
            outputs = OPS[node.op_type](inputs, attrs, self.opset)
            for name, value in zip(node.output, outputs, strict=False):
                if name:
                    env[name] = self._seen(name, value)
        return {name: env[name] if name in env else self._value(name, env) for name in self.output_names}

    def _seen(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return self.tensor_view(name, value) if self.tensor_view is not None else value

    def _value(self, name: str, env: dict[str, torch.Tensor]) -> torch.Tensor:
        if name in env:
            return env[name]
        key = self.weight_keys.get(name)
        if key is not None:
            w = self.weights[key]
            return self.weight_view(name, w) if self.weight_view is not None else w
        return getattr(self, self.constant_keys[name])
