"""quantize calibrates through the input file while no pass changed the graph: the same bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_file_backed import _mlp

from onnxcomp import runtime
from onnxcomp.api import quantize


def test_quantize_from_the_file_equals_quantize_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrating through the input file (the graph is unchanged before quantize) writes the same
    bytes as calibrating through an exported copy (the in-memory input has no file)."""
    model = _mlp(0)
    src = tmp_path / "mlp.onnx"
    onnx.save(model, str(src))
    data = {"x": np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)}
    copies: list[str] = []
    copy = shutil.copyfile
    monkeypatch.setattr(runtime.shutil, "copyfile", lambda a, b: copies.append(str(a)) or copy(a, b))
    for observer in ("minmax", "histogram"):
        a, b = tmp_path / f"a_{observer}.onnx", tmp_path / f"b_{observer}.onnx"
        quantize(src, a, calibration=[data], observer=observer, reports=False)
        assert copies == [str(src)]  # the calibration session read the input file
        quantize(onnx.load(str(src)), b, calibration=[data], observer=observer, reports=False)
        assert copies == [str(src)]  # no file: an exported copy, as before
        copies.clear()
        assert a.read_bytes() == b.read_bytes()
        assert (
            a.with_name(f"a_{observer}.quant_record.json").read_bytes()
            == b.with_name(f"b_{observer}.quant_record.json").read_bytes()
        )
