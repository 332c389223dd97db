"""``prepare``: run the passes ``quantize`` / ``sparsify`` would run, and wrap the result for training."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from onnxcomp.calibration.data import CalibrationData, calibration_source
from onnxcomp.execute import LOCATE, ModelLike
from onnxcomp.flags import quantize_options, sparsify_passes, with_fusions
from onnxcomp.framework import PassContext, PassManager, make_pass
from onnxcomp.ir.mapped import tensor_values
from onnxcomp.model_io import load_model
from onnxcomp.qat.engine import torch
from onnxcomp.qat.options import check_options, starts_from_ptq
from onnxcomp.qat.prepared import QATModule


def _context(
    seed: int, calibration: CalibrationData | None, model: onnx.ModelProto, batch_size: int, samples: int | None
) -> PassContext:
    ctx = PassContext(seed=seed)
    if calibration is not None:
        ctx.calibration, ctx.calibration_name = calibration_source(calibration, model, batch_size, samples)
    return ctx


def prepare(
    model: ModelLike,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    calibration: CalibrationData | None = None,
    *,
    pattern: str | None = None,
    prune_ratio: float | None = None,
    sparsity_method: str | None = None,
    fuse: bool = True,
    calib_samples: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    **quantize_flags: Any,
) -> QATModule:
    """A :class:`QATModule` of ``model`` with the quantization ``onnxcomp quantize`` would write.

    ``config`` (a TOML file or mapping of ``quantize`` options) and ``quantize_flags`` (the keywords
    of :func:`onnxcomp.flags.quantize_options`: ``weights``, ``activations``, ``granularity``, ...)
    choose the quantization; with neither, the module is the float model (sparsity retraining).
    ``pattern`` ("2:4") or ``prune_ratio`` (channel pruning) sparsify the float model first, as
    ``onnxcomp sparsify`` does; the masks stay fixed in training. ``calibration`` gives the PTQ
    ranges the activation scales start from.
    """
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    if pattern is not None or prune_ratio is not None:
        passes = sparsify_passes(pattern=pattern, ratio=prune_ratio, fuse=fuse, method=sparsity_method)
    else:
        passes = with_fusions([], fuse)
    float_model = proto
    if passes:
        ctx = _context(seed, calibration, proto, batch_size, calib_samples)
        float_model = PassManager(passes, validate=LOCATE).run(proto, ctx).model
    if config is None and not quantize_flags:
        return QATModule(float_model, None, [])
    options = quantize_options(config, **{"reports": False, **quantize_flags})
    check_options(options)
    # one run of the whole pipeline, as `onnxcomp quantize` / `sparsify --quantize` runs it: the export
    # patches this model, so its bytes (initializer order included) are those of the PTQ output
    ctx = _context(seed, calibration, proto, batch_size, calib_samples)
    quantized = PassManager([*passes, make_pass("quantize", options)], validate=LOCATE).run(proto, ctx).model
    record = ctx.artifacts.get("quant_record", [])
    module = QATModule(float_model, quantized, record)

    def simulation() -> onnx.ModelProto:  # what `quantize --simulation-output` writes
        sim = make_pass("quantize", {**options, "emit": "simulate", "report_batches": 0})
        sim_ctx = _context(seed, calibration, proto, batch_size, calib_samples)
        return PassManager([*passes, sim], validate=LOCATE).run(proto, sim_ctx).model

    module.simulation_source = simulation
    if starts_from_ptq(options):  # GPTQ's codes, corrected biases, equalized weights: the PTQ run's float values
        _start_from(module, quantized, simulation())
    return module


def _start_from(module: QATModule, deployed: onnx.ModelProto, simulation: onnx.ModelProto) -> None:
    """Set the module's parameters to the float values the PTQ run quantized (the masks stay the float model's).

    Each quantized weight as PTQ dequantized it (``simulation``'s ``NAME_fakequant``: GPTQ's codes), each
    int32 bias as its codes times their scale, every other parameter from the same-named initializer
    of the ``deployed`` model (biases moved by bias correction, weights rescaled by equalization).
    Rounding these again on the PTQ scales gives the PTQ codes, so the untrained export is the PTQ model.
    """
    deploy = {t.name: t for t in deployed.graph.initializer}
    sim = {t.name: t for t in simulation.graph.initializer}
    values: dict[str, np.ndarray] = {}
    for name in module.graph.weight_keys:
        if name in module._weight_keys:
            values[name] = tensor_values(sim[f"{name}_fakequant"])
        elif name in module._biases:
            slot = module._biases[name].slot
            assert slot.codes is not None
            codes = tensor_values(deploy[slot.codes]).astype(np.float64)
            values[name] = codes * tensor_values(deploy[slot.scale]).astype(np.float64)
        elif name in deploy and deploy[name].data_type == onnx.TensorProto.FLOAT:
            values[name] = tensor_values(deploy[name])
    with torch.no_grad():
        for name, value in values.items():
            param = module.graph.weight(name)
            if tuple(value.shape) == tuple(param.shape):
                param.copy_(torch.from_numpy(value.astype(np.float32)))
