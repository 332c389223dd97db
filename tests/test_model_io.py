"""Model I/O: one-line errors with exit code 1, external data, atomic writes, input untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_bn_model
from onnx import TensorProto, helper

from onnxcomp.cli.main import main
from onnxcomp.errors import ModelLoadError, OnnxCompError
from onnxcomp.model_io import load_model, ort_max_opset, save_model
from onnxcomp.testing import random_feeds, run_model


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert err.startswith("onnxcomp: error: ")
    return err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _cli_error(capsys, ["inspect", str(tmp_path / "nope.onnx")])
    assert "nope.onnx: no such file" in err


def test_not_a_protobuf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe this is not onnx \x00\x01" * 10)
    err = _cli_error(capsys, ["fuse", str(bad), "-o", str(tmp_path / "o.onnx")])
    assert "bad.onnx: not an ONNX model" in err


def test_truncated_file(tmp_path: Path, conv_bn_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = conv_bn_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    err = _cli_error(capsys, ["inspect", str(cut)])
    assert "cut.onnx: not an ONNX model" in err and "truncated" in err


def test_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "empty.onnx: file is empty" in _cli_error(capsys, ["inspect", str(empty)])


def test_checker_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = conv_bn_model()
    model.graph.node[1].input[0] = "does_not_exist"  # BN reads an undefined tensor
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    err = _cli_error(capsys, ["fuse", str(path), "-o", str(tmp_path / "o.onnx")])
    assert "broken.onnx: fails onnx.checker" in err


def test_opset_too_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    too_new = ort_max_opset() + 1
    model = conv_bn_model()
    model.opset_import[0].version = too_new
    path = tmp_path / "new.onnx"
    onnx.save(model, str(path))
    err = _cli_error(capsys, ["inspect", str(path)])
    assert f"opset {too_new} is newer than onnxruntime" in err and "re-export" in err


def test_usage_error_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fuse"])
    assert exc.value.code == 2


def test_debug_shows_traceback(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        main(["--debug", "inspect", str(tmp_path / "nope.onnx")])


def test_external_data_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The >2 GB path (external data) exercised on a small model saved that way."""
    model = conv_bn_model()
    src = tmp_path / "ext.onnx"
    onnx.save_model(conv_bn_model(), str(src), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").exists()
    loaded = load_model(src)
    feeds = random_feeds(model)
    np.testing.assert_array_equal(run_model(loaded, feeds)[0], run_model(model, feeds)[0])
    out = tmp_path / "fused.onnx"
    assert main(["fuse", str(src), "-o", str(out), "--external-data"]) == 0
    assert (tmp_path / "fused.onnx.data").exists()
    np.testing.assert_allclose(run_model(load_model(out), feeds)[0], run_model(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_missing_external_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ext.onnx"
    onnx.save_model(conv_bn_model(), str(src), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    assert "external data" in _cli_error(capsys, ["inspect", str(src)])


def test_input_never_modified_and_no_overwrite(
    conv_bn_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = hashlib.sha256(conv_bn_path.read_bytes()).hexdigest()
    out = tmp_path / "out.onnx"
    assert main(["fuse", str(conv_bn_path), "-o", str(out)]) == 0
    assert hashlib.sha256(conv_bn_path.read_bytes()).hexdigest() == before
    first = out.read_bytes()
    err = _cli_error(capsys, ["fuse", str(conv_bn_path), "-o", str(out)])
    assert "already exists" in err and "--force" in err
    assert out.read_bytes() == first
    assert "overwrite the input" in _cli_error(capsys, ["fuse", str(conv_bn_path), "-o", str(conv_bn_path), "--force"])
    assert hashlib.sha256(conv_bn_path.read_bytes()).hexdigest() == before


def test_save_is_atomic_no_temp_left(tmp_path: Path) -> None:
    model = conv_bn_model()
    out = tmp_path / "m.onnx"
    save_model(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(OnnxCompError, match="already exists"):
        save_model(model, out)
    save_model(model, out, overwrite=True)
    with pytest.raises(OnnxCompError, match="does not exist"):
        save_model(model, tmp_path / "nodir" / "m.onnx")


def test_failed_run_writes_nothing(tmp_path: Path, conv_bn_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\npass = "no_such_pass"\n')
    out = tmp_path / "out.onnx"
    _cli_error(capsys, ["run", str(recipe), str(conv_bn_path), "-o", str(out)])
    assert not out.exists()


def test_opset_above_emit_cap_is_converted(tmp_path: Path) -> None:
    """A model at opset 26..28 (ORT loads it) is converted down to 25, never emitted above."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 26)])
    path = tmp_path / "m26.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "o.onnx"
    assert main(["fuse", str(path), "-o", str(out)]) == 0
    assert onnx.load(str(out)).opset_import[0].version == 25
