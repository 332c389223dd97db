"""Learned scales of float (FP8 / HiF8) activations written into ``quantize``'s subgraphs.

Static FP8 and HiF8 activations are not a QuantizeLinear/DequantizeLinear pair but an exact
subgraph (``onnxcomp.quant.activation_subgraphs``) whose constants derive from the scale (``s``,
``s 2^-k``, a sign threshold, ...). Rather than knowing that form here, the export emits the same
subgraph twice on the same tensor of the model: once with the PTQ scale, once with the learned
one. The constants the two emissions differ in are the scale's; each must equal, by name and value,
a constant of the model (else the emitter's form changed: a one-line error), which then gets the
learned value.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import ir
from onnxcomp.errors import OnnxCompError
from onnxcomp.ir.mapped import tensor_values
from onnxcomp.quant.activation_subgraphs import emit_cast_activation, emit_hif8_activation

#: float activation formats whose static per-tensor scale QAT learns
FLOAT_ACTIVATIONS = ("fp8_e4m3", "fp8_e5m2", "hif8")


def subgraph_prefix(tensor: str, dtype: str) -> str:
    """The name prefix ``quantize`` gives the subgraph of ``tensor`` (quant.apply._quantize_activation)."""
    return f"{tensor}_hif8" if dtype == "hif8" else f"{tensor}_{dtype}"


def _emit(graph: ir.Graph, tensor: ir.Tensor, dtype: str, scale: float, prefix: str) -> dict[str, np.ndarray]:
    """The constants (suffix after ``prefix`` -> value) of one emission of the subgraph."""
    if dtype == "hif8":
        emit_hif8_activation(graph, tensor, scale, prefix)
    else:
        emit_cast_activation(graph, tensor, scale, dtype, prefix)
    found = {}
    for name, t in graph.tensors().items():
        value = ir.constant_value(t) if name.startswith(f"{prefix}_") else None
        if value is not None:
            found[name[len(prefix) + 1 :]] = value
    return found


def put_float_activation_scales(
    model: onnx.ModelProto, scales: Mapping[str, tuple[str, float, float]], where: str
) -> None:
    """Rewrite ``model``'s subgraph constants for ``scales``: tensor -> (format, PTQ scale, learned scale)."""
    changed = {name: v for name, v in scales.items() if np.float32(v[1]) != np.float32(v[2])}
    if not changed:
        return
    graph = ir.import_model(model)
    tensors = graph.tensors()
    inits = {t.name: t for t in model.graph.initializer}
    for i, (name, (dtype, ptq, learned)) in enumerate(sorted(changed.items())):
        if name not in tensors:
            raise OnnxCompError(f"{where}: no tensor {name!r} for its {dtype} activation subgraph")
        before = _emit(graph, tensors[name], dtype, ptq, f"onnxcomp_qat_{i}_ptq")
        after = _emit(graph, tensors[name], dtype, learned, f"onnxcomp_qat_{i}_learned")
        prefix = subgraph_prefix(name, dtype)
        for suffix, value in after.items():
            old = before.get(suffix)
            if old is not None and old.shape == value.shape and np.array_equal(old, value):
                continue  # does not depend on the scale
            init = inits.get(f"{prefix}_{suffix}")
            if init is None or old is None or not np.array_equal(tensor_values(init), old):
                raise OnnxCompError(
                    f"{where}: the {dtype} subgraph of {name!r} has no constant {prefix}_{suffix} as quantize emits it; "
                    "its emitter changed: update onnxcomp/qat/reemit.py"
                )
            init.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(old.dtype), init.name))
