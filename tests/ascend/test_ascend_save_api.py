"""quantize --target ascend writes a deploy model of 2 GB and more as one file per initializer (forced threshold)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from test_ascend_save import _check_split, _model

import onnxcomp
from onnxcomp.quant.ascend import save


def test_quantize_writes_a_large_deploy_model_as_one_file_per_initializer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model = _model(tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(0.2, 1.0, (32, 2, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    onnxcomp.quantize(model, tmp_path / "small.onnx", calibration=tmp_path / "calib.npz", target="ascend")
    assert not any(p.name.startswith("small.onnx.") for p in tmp_path.iterdir())  # below 2 GB: one file
    monkeypatch.setattr(save, "PER_INITIALIZER_FROM", 0)  # every model counts as >= 2 GB
    out = tmp_path / "q.onnx"
    onnxcomp.quantize(model, out, calibration=tmp_path / "calib.npz", target="ascend")
    locations = _check_split(out, x, tmp_path / "q.fake_quant.onnx", tmp_path / "q.record.txt")
    assert "q.onnx.fc.w.quant" in locations
    fake = onnx.load(tmp_path / "q.fake_quant.onnx", load_external_data=False)  # onnxruntime's model: one file
    assert all(t.data_location != TensorProto.EXTERNAL for t in fake.graph.initializer)
