"""``train``: prepare, train and export in one call (what ``onnxcomp qat`` runs)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.errors import OnnxCompError
from onnxcomp.model_io import load_model, save_model, write_text_atomic
from onnxcomp.qat.build import prepare
from onnxcomp.qat.prepared import QATModule
from onnxcomp.qat.training import TrainReport, fit, load_training_data

#: Calibration samples taken from the training data when no --calib is given.
CALIBRATION_SAMPLES = 128


def learned_record(module: QATModule) -> list[dict[str, Any]]:
    """The quantize record with the trained scales in place of the PTQ ones."""
    record = copy.deepcopy(module.record)
    for entry in record:
        w = entry.get("weights")
        if w is not None and w["tensor"] in module._weight_keys:
            w["scale"] = module.scale_of(w["tensor"]).tolist()
        for a in [*(entry.get("activations") or []), *(entry.get("outputs") or [])]:
            if isinstance(a, dict) and a.get("tensor") in module._act_keys:
                a["scale"] = float(module.scale_of(a["tensor"]))
        entry["trained"] = "quantization-aware training (onnxcomp qat)"
    return record


def train(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    labels: str | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    pattern: str | None = None,
    ratio: float | None = None,
    calibration: str | os.PathLike[str] | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = False,
    **quantize_flags: Any,
) -> TrainReport:
    """Quantization-aware training (or sparse retraining) of ``model`` on ``data``; writes ``output``.

    ``quantize_flags`` are those of :func:`onnxcomp.flags.quantize_options` (``weights``,
    ``activations``, ``granularity``, ...); none given = retrain the float (sparsified) model.
    The loss is distillation from ``model``'s float outputs unless ``labels`` names an array of
    ``data``. Writes the best epoch's export, ``OUT.qat_record.json`` (history) and, for a
    quantized model, ``OUT.quant_record.json``; ``OUT.qat_checkpoint.pt`` serves ``resume``.
    """
    out = Path(output)
    if out.exists() and not force and not resume:
        raise OnnxCompError(f"{out}: already exists; choose another output path or pass --force")
    proto = load_model(Path(model))
    inputs = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    arrays, label_values = load_training_data(Path(data), inputs, labels)
    calib: Any = calibration
    if calib is None:
        calib = [{k: v[:CALIBRATION_SAMPLES] for k, v in arrays.items()}]
    module = prepare(proto, None, calib, pattern=pattern, prune_ratio=ratio, seed=seed, **quantize_flags)
    report = fit(
        module,
        arrays,
        labels=label_values,
        teacher=proto,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        checkpoint=out.with_name(f"{out.stem}.qat_checkpoint.pt"),
        resume=resume,
        progress=progress,
    )
    save_model(module.export_model(), out, overwrite=True)
    history = {"metric": report.metric, "best_epoch": report.best_epoch, "history": report.history}
    write_text_atomic(out.with_name(f"{out.stem}.qat_record.json"), json.dumps(history, indent=2) + "\n")
    if module.quantized_model is not None:
        record = json.dumps(learned_record(module), indent=2, default=_plain) + "\n"
        write_text_atomic(out.with_name(f"{out.stem}.quant_record.json"), record)
    return report


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else float(value)
