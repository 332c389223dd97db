"""`onnxcomp fuse` on real models shipped in PyPI packages (BN folding on a real CNN)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from real_models import make_inputs

from onnxcomp.cli.main import main
from onnxcomp.model_io import load_model
from onnxcomp.testing import op_counts, run_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["ppocr_cls", "ppocr_det"])
def test_fuse_real_cnn(name: str, tmp_path: Path, fused_real_model) -> None:  # noqa: ANN001
    src, out = fused_real_model(name)  # `onnxcomp -q fuse src -o out`, run once per session
    original, fused = load_model(src), load_model(out)
    before, after = op_counts(original), op_counts(fused)
    assert after.get("BatchNormalization", 0) == 0 and after.get("Identity", 0) == 0
    assert sum(after.values()) < sum(before.values())
    feeds = make_inputs(name, 2, 0)
    want = run_model(original, feeds, level="disable")  # the reference, run once for both levels
    for level in ("disable", "all"):
        got = run_model(fused, feeds, level=level)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(w).max())))
    again = tmp_path / "again.onnx"
    assert main(["-q", "fuse", str(src), "-o", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()
    onnx.checker.check_model(fused, full_check=True)
