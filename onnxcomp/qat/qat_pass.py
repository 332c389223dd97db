"""The ``qat`` pass: quantization-aware training (or sparse retraining) as a step of a recipe.

Not a built-in (the built-in passes sit below the training engine); a recipe names it as
``onnxcomp.qat.qat_pass:QuantizationAwareTraining`` (``docs/writing-a-pass.md``); it is not
registered under a name, so the resolved recipe names it by that path too. It trains the graph
it is given (the fusions of the recipe already ran) on ``data`` and leaves in its place the model
``onnxcomp qat`` would write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxcomp import ir
from onnxcomp.errors import RecipeError
from onnxcomp.flags import quantize_options
from onnxcomp.framework import Pass, PassContext, PassResult, make_pass
from onnxcomp.qat.build import prepare
from onnxcomp.qat.recipe import CALIBRATION_SAMPLES, learned_record
from onnxcomp.qat.training import fit, load_training_data


class QuantizationAwareTraining(Pass):
    """Train the model with fake quant where ``quantize`` puts Q/DQ (and fixed sparsity masks), then export it.

    ``weights`` (a format, or "none": retrain in float), ``activations``, ``granularity``: as for
    ``quantize``; ``pattern`` / ``ratio``: sparsify first. Distillation from the pass's input unless
    ``labels`` names an array of ``data``. Declines nothing silently: bad data or a configuration
    QAT cannot start from is a one-line error.
    """

    name = "qat"
    keeps_outputs_close = False  # training moves the outputs by design (toward labels or through sparsity)

    @dataclass(frozen=True)
    class Options:
        data: str = ""
        labels: str | None = None
        epochs: int = 1
        lr: float = 1e-4
        batch_size: int = 32
        weights: str = "none"
        activations: str = "none"
        granularity: str | None = None
        pattern: str | None = None
        ratio: float | None = None

    def _quantize_flags(self) -> dict[str, Any]:
        o = self.options
        if o.weights == "none":
            return {}
        flags: dict[str, Any] = {"weights": o.weights, "activations": o.activations}
        if o.granularity is not None:
            flags["granularity"] = o.granularity
        return flags

    def min_opset(self) -> int | None:
        flags = self._quantize_flags()
        return make_pass("quantize", quantize_options(**flags)).min_opset() if flags else None

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if not o.data:
            raise RecipeError("pass 'qat': option data (an .npz or a directory of .npz) is required")
        assert ctx.source_model is not None  # the manager sets it before any pass runs
        model = ir.export_model(graph, ctx.source_model)
        inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        arrays, labels = load_training_data(Path(o.data), inputs, o.labels)
        calibration = [{k: v[:CALIBRATION_SAMPLES] for k, v in arrays.items()}]
        module = prepare(
            model,
            None,
            calibration,
            pattern=o.pattern,
            prune_ratio=o.ratio,
            fuse=False,
            seed=ctx.seed,
            **self._quantize_flags(),
        )
        report = fit(
            module,
            arrays,
            labels=labels,
            teacher=model,
            epochs=o.epochs,
            lr=o.lr,
            batch_size=o.batch_size,
            seed=ctx.seed,
        )
        trained = ir.import_model(module.export_model())
        vars(graph).clear()  # the pass contract rewrites `graph` in place: it becomes the trained model
        vars(graph).update(vars(trained))
        if module.quantized_model is not None:
            ctx.set_record("quant", learned_record(module))
        ctx.artifacts["qat_record"] = {
            "metric": report.metric,
            "best_epoch": report.best_epoch,
            "history": report.history,
        }
        result = PassResult(modified=True)
        result.stats = {"epochs": o.epochs, "kept_epoch": report.best_epoch}
        return result
