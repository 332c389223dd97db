"""How each Ascend layer's weight is rounded: a distilled weight, GPTQ, or round to nearest, on ATC's grid.

The pipeline hands :func:`weight_quantizer`'s choice to :func:`onnxcomp.quant.ascend.layers.make_layer`,
which applies it to the layer's Ascend weight spec (symmetric INT8 / INT4; per channel for
convs, per tensor for Gemm / MatMul). GPTQ keeps the round-to-nearest grid (scales) and changes
codes only; a distilled weight may also bring learned scales (docs/ascend.md).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from onnxcomp import ir
from onnxcomp.framework.base import PassContext
from onnxcomp.quant.ascend.layers import WeightQuantizer
from onnxcomp.quant.gptq import gptq_quantize
from onnxcomp.quant.plan import NodePlan
from onnxcomp.quant.qweight import QuantizedWeight
from onnxcomp.quant.spec import TensorSpec
from onnxcomp.quant.weights import quantize_weight

#: What a pass learns before the layers are written (the ``distill`` pass): node -> QuantizedWeight, node -> notes.
Learner = Callable[
    [ir.Graph, list[NodePlan], dict[str, tuple[float, float]], Any, PassContext, dict[str, Any]],
    tuple[dict[str, QuantizedWeight], dict[str, dict[str, Any]]],
]


def weight_quantizer(
    node: str, gptq: tuple[bool, float], hessians: dict[str, np.ndarray], learned: dict[str, QuantizedWeight]
) -> WeightQuantizer:
    """A distilled weight as it was learned; GPTQ where its Hessian was collected; else round to nearest.

    ``gptq``: (act_order, damp) of GPTQ.
    """
    if node in learned:
        qw = learned[node]
        return lambda w, spec, layout, name: qw
    if node in hessians:
        return partial(_gptq, hessian=hessians[node], act_order=gptq[0], damp=gptq[1])
    return partial(_gptq, hessian=None, act_order=False, damp=0.0)


def _gptq(
    w: np.ndarray,
    spec: TensorSpec,
    layout: ir.WeightLayout,
    name: str,
    *,
    hessian: np.ndarray | None,
    act_order: bool,
    damp: float,
) -> QuantizedWeight:
    if hessian is None:
        return quantize_weight(w, spec, layout, name)
    qw = gptq_quantize(w, spec, layout, hessian, name=name, act_order=act_order, damp=damp)
    qw.algorithm = {"name": "gptq", "act_order": act_order, "damp": damp}
    return qw
