"""distill: quantization whose rounding, scales and biases are learned layer by layer (docs/distill.md).

The float model is the teacher, the quantized model the student. Everything but the learned
numbers is the ``quantize`` pass: the same planning, calibration, scale migration, emitters,
record and report; each planned Conv/ConvTranspose/Gemm/MatMul block is distilled on the
calibration data (no labels) just before the emitters write it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnxcomp import ir
from onnxcomp.errors import CalibrationError, RecipeError
from onnxcomp.framework.base import PassContext
from onnxcomp.framework.registry import register_pass
from onnxcomp.passes.quantize import Quantize
from onnxcomp.quant.distill.driver import distill_plans
from onnxcomp.quant.distill.train import Settings
from onnxcomp.quant.plan import NodePlan


@register_pass
class Distill(Quantize):
    """Layer-wise distillation on top of the ``quantize`` pass (every DQ weight storage, HiF8's and FP4's tables, two-level FP4).

    Per block (a quantized layer plus its elementwise tail), in topological order, on the input the
    deployed model computes (earlier blocks' learned weights and every static activation
    quantizer): AdaRound-style rounding between the two neighbouring grid codes, LSQ-style
    per-unit scales (not for MX or two-level FP4, whose scales are powers of two / FP8), the bias
    and optionally the input's clipping range are learned with Adam against the float model's
    tensor at the block's end. A block keeps round-to-nearest, with the reason in the record,
    when its weight is shared, it is a batched MatMul, or learning did not beat round-to-nearest
    on its data. Needs calibration data.
    """

    name = "distill"

    @dataclass(frozen=True)
    class Options(Quantize.Options):
        iters: int = 300  # Adam steps per block
        lr: float = 0.1  # step of the rounding variables (scales: lr / 10, bias: relative to the output)
        batch_rows: int = 1024  # output rows (positions) per step
        round_weight: float = 1.0  # weight of the rounding regularizer
        learn_rounding: bool = True
        learn_scales: bool = True
        learn_bias: bool = True
        learn_ranges: bool = False  # each block input's clipping range (static activations)
        balance_channels: bool = True  # each output channel's error weighted by 1 / its energy
        teacher_input: bool = False  # feed each block the teacher's input instead of the student's
        memory_mb: int = 1024  # collected tensors beyond this go to a memory-mapped temporary file

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        o = self.options
        if o.weight_algorithm == "gptq":
            raise RecipeError("distill learns the rounding itself: use weight_algorithm rtn (or awq), not gptq")
        if o.accuracy_target is not None or o.sensitivity:
            raise RecipeError("distill does not run the accuracy search: use the quantize pass for accuracy_target")
        if o.iters < 0 or o.lr <= 0 or o.batch_rows < 1 or o.memory_mb < 1:
            raise RecipeError("distill: iters >= 0, lr > 0, batch_rows >= 1 and memory_mb >= 1 are required")

    def learn_weights(
        self,
        graph: ir.Graph,
        plans: list[NodePlan],
        ranges: dict[str, tuple[float, float]],
        float_model: Any,
        ctx: PassContext,
        energies: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        if ctx.calibration is None or float_model is None:
            raise CalibrationError("distill needs calibration data (unlabelled inputs): pass --calib DATA")
        o = self.options
        settings = Settings(
            o.iters,
            o.lr,
            o.batch_rows,
            o.round_weight,
            o.learn_rounding,
            o.learn_scales,
            o.learn_bias,
            o.learn_ranges,
            o.balance_channels,
        )
        outcome = distill_plans(
            graph,
            plans,
            ranges,
            float_model,
            ctx,
            settings,
            fp4_storage=o.fp4_storage,
            energies=energies,
            calib_batches=o.calib_batches,
            teacher_input=o.teacher_input,
            memory_mb=o.memory_mb,
        )
        ranges.update(outcome.ranges)  # the emitters write the learned clipping ranges
        return outcome.learned, outcome.entries
