"""One serialisation per run: the validated bytes are what is saved, and nothing model-sized is kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

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


def test_validation_session_reads_a_file_not_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-memory model's final check hands onnx.checker and onnxruntime a file of the serialised
    result (the bytes object is dropped while the session is built); the saved file has those very
    bytes. (A model given as a file is mapped and validated from the file written: test_mapped.)"""
    import onnxcomp.framework.manager as manager

    calls: list[dict[str, object]] = []
    real = manager.validate_model

    def spy(model: onnx.ModelProto, serialized: bytes | None = None, file: Path | None = None):  # noqa: ANN202
        calls.append({"serialized": serialized, "file": file, "bytes": file.read_bytes() if file else None})
        return real(model, serialized=serialized, file=file)

    monkeypatch.setattr(manager, "validate_model", spy)
    out = tmp_path / "q.onnx"
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    quantize(model, out, calibration=MODELS / "digits_calib.npz", reports=False)
    assert len(calls) == 1 and calls[0]["serialized"] is None and isinstance(calls[0]["file"], Path)
    assert calls[0]["bytes"] == out.read_bytes()


def _madvise_hugepage() -> bool:
    """numpy's current huge-page setting (read by setting it back to what it was)."""
    setter = np._core.multiarray._set_madvise_hugepage
    current = setter(True)
    setter(current)
    return bool(current)


@pytest.mark.parametrize("before", [True, False])
def test_runs_allocate_without_huge_pages_and_restore_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: bool
) -> None:
    """Inside a run numpy asks for no transparent huge pages (runtime.small_pages); the caller's
    setting is back afterwards, also when the run fails."""
    import onnxcomp.quant.apply as apply

    seen: list[bool] = []
    real = apply.quantize_weight

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(_madvise_hugepage())
        return real(*args, **kwargs)

    monkeypatch.setattr(apply, "quantize_weight", spy)
    setter = np._core.multiarray._set_madvise_hugepage
    previous = setter(before)
    try:
        quantize(MODELS / "digits_cnn.onnx", tmp_path / "q.onnx", weights="int8", activations="none", reports=False)
        assert seen and not any(seen)
        assert _madvise_hugepage() is before
        with pytest.raises(Exception, match="already exists"):
            quantize(MODELS / "digits_cnn.onnx", tmp_path / "q.onnx", weights="int8", activations="none")
        assert _madvise_hugepage() is before
    finally:
        setter(previous)
