"""flush_denormals: set subnormal float weights to zero."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp import ir
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass


@register_pass
class FlushDenormals(Pass):
    """Replace subnormal values (0 < |w| < smallest normal) of float constants by zero.

    Subnormal weights are below any useful precision (|w| < 1.2e-38 in float32) but send the CPU
    down a slow path: a real PP-OCR detector with 10% subnormal weights runs 3.6x slower in
    onnxruntime than with them flushed, with identical outputs. Declines nothing; leaves
    non-float and sub-byte constants alone.
    """

    name = "flush_denormals"
    bodies = True  # also rewrites inside If/Loop/Scan bodies (never across their boundary)

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"tensors": 0, "values": 0})
        for tensor in list(graph.tensors().values()):
            if not isinstance(tensor, ir.Constant):
                continue
            value = ir.constant_value(tensor)
            if value is None or value.dtype not in (np.float32, np.float16, np.float64):
                continue
            tiny = np.finfo(value.dtype).tiny
            sub = (value != 0) & (np.abs(value) < tiny)
            count = int(np.count_nonzero(sub))
            if count:
                ir.set_constant(tensor, np.where(sub, np.zeros((), value.dtype), value))
                result.stats["tensors"] += 1
                result.stats["values"] += count
                result.changed.append(tensor.name)
                result.modified = True
        return result
