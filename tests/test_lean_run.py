"""One serialisation per run: the validated bytes are what is saved, and nothing model-sized is kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxcomp.api import quantize
from onnxcomp.model_io import load_model, save_model, serialize_model, validate_model
from onnxcomp.testing import run_model

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_saved_file_is_the_validated_serialisation(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    report = quantize(MODELS / "digits_cnn.onnx", out, calibration=MODELS / "digits_calib.npz", reports=False)
    assert out.read_bytes() == report.model.SerializeToString(deterministic=True)
    assert report.serialized is None  # dropped once saved: the caller has report.model


def test_validate_and_save_from_shared_bytes(tmp_path: Path) -> None:
    model = load_model(MODELS / "digits_cnn.onnx")
    data = serialize_model(model)
    assert data is not None
    session = validate_model(model, serialized=data)
    x = np.load(MODELS / "digits_calib.npz")["input"][:4]
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], run_model(model, {"input": x})[0])
    written = save_model(model, tmp_path / "m.onnx", serialized=data)
    assert written == [tmp_path / "m.onnx"] and written[0].read_bytes() == data
    assert onnx.load(str(written[0])) == model
