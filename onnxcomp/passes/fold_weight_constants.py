"""fold_weight_constants: weights computed by a constant chain become plain initializers."""

from __future__ import annotations

from dataclasses import dataclass

from onnxcomp import ir
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass

#: The inputs of each op that hold weights (what the fusions and compression passes rewrite).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2, 3, 4),
}


@register_pass
class FoldWeightConstants(Pass):
    """Replace a weight written as a constant chain by one initializer holding its value.

    Exporters write weights as ``Transpose(W)``, ``Reshape(W, shape)``, ``Cast(W_bf16)``,
    ``Mul(W, scale)``, ``Squeeze``/``Unsqueeze`` or a ``Constant`` node; the fusions and the
    compression passes rewrite initializers, so this pass runs first (``ir.float_weight`` is the
    definition both share). Only the weight inputs of Conv, ConvTranspose, Gemm, MatMul and
    BatchNormalization are folded, and only when the file does not grow (a Cast fp16 -> fp32 or a
    source another node also reads would; the quantizer folds those itself, since it shrinks them
    afterwards). A DequantizeLinear of stored codes is already quantized and left alone.
    """

    name = "fold_weight_constants"
    bodies = True  # also inside If/Loop/Scan bodies (a body's chain over an outer weight would grow: kept)

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False, stats={"folded": 0})
        for node in ir.iter_nodes(graph, WEIGHT_INPUTS):
            if not ir.is_onnx_op(node):
                continue
            for index in WEIGHT_INPUTS[node.op]:
                if index >= len(node.inputs) or not node.inputs[index].name:
                    continue
                tensor = node.inputs[index]
                if not ir.is_foldable_chain(graph, tensor):
                    continue
                growth = ir.fold_growth(tensor)
                if growth > 0:
                    result.declined.append(
                        (node.name, f"input {tensor.name!r} kept as a chain: folding would add {growth} bytes")
                    )
                    continue
                ir.fold_constant_input(graph, node, index)
                result.stats["folded"] += 1
                result.changed.append(tensor.name)
                result.modified = True
        return result
