"""The student model blocks read their input from: the float model plus the deployed activation quantization.

In sequential mode block k learns on the input the deployed model computes: every earlier block's
learned weights (written into the student's initializers as each block finishes) *and* every
static activation quantizer of the plan (the Q/DQ or FP8/HiF8 fake quantization the emitters put
on layer inputs and, with ``output_quant``, on layer outputs). The quantizers are inserted once,
with the same emitters and the same calibrated ranges as :mod:`onnxcomp.quant.apply`, because
the ranges do not depend on the learned weights. A quantizer keeps its tensor's name on the float
side (the emitters rewire the readers to a new tensor), so collecting a block's input by name
gives the float tensor and the block's own input quantizer is simulated in numpy on top.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from onnxcomp import ir
from onnxcomp.formats import ElementFormat, IntegerFormat, get_format
from onnxcomp.quant.emit import activation_qparams, emit_static_activation
from onnxcomp.quant.plan import NodePlan
from onnxcomp.quant.spec import TensorSpec


def _emit_fake_quant(graph: ir.Graph, tensor: ir.Tensor, spec: TensorSpec, lo: float, hi: float) -> None:
    """What ``quant.apply`` emits for a static per-tensor activation (every reader rewired)."""
    scale, zp = activation_qparams(spec.dtype, lo, hi, spec.symmetric)
    emit_static_activation(graph, tensor, spec.dtype, scale, zp)


def student_model(
    float_model: onnx.ModelProto, plans: list[NodePlan], ranges: Mapping[str, tuple[float, float]]
) -> tuple[onnx.ModelProto, list[str]]:
    """``float_model`` with every static activation quantizer of ``plans``, and what could not be simulated.

    The quantizers are those of the deployed model: per-tensor activations with a calibrated
    range, on each plan's activation inputs and outputs (once per tensor). Dynamic (per-token,
    MX) activation quantization is computed from the tensor itself by the deployed model and is
    listed as not simulated; so is a tensor the float model does not have (a Transpose the
    planner added).
    """
    graph = ir.import_model(float_model)
    tensors = graph.tensors()
    done: set[str] = set()
    missing: list[str] = []
    for plan in plans:
        spec = plan.spec.activations
        if spec is None:
            continue
        for t in plan.activation_inputs + plan.activation_outputs:
            if t.name in done:
                continue
            done.add(t.name)
            target = tensors.get(t.name)
            usable = isinstance(get_format(spec.dtype), (IntegerFormat, ElementFormat))
            if spec.granularity.kind != "tensor" or not usable or t.name not in ranges or target is None:
                missing.append(t.name)
                continue
            if ir.is_graph_output(graph, target):  # its name would move to the quantized side
                missing.append(t.name)
                continue
            lo, hi = ranges[t.name]
            _emit_fake_quant(graph, target, spec, lo, hi)
    ir.finalize(graph)
    return ir.export_model(graph, float_model), missing


__all__ = ["student_model"]
