"""The deploy model of 2 GB and more: one external file per initializer, as AMCT writes it (forced threshold here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp.errors import OnnxCompError
from onnxcomp.quant.ascend import save
from onnxcomp.quant.ascend.consistency import record_mismatches
from onnxcomp.quant.ascend.record import parse_record
from onnxcomp.quant.ascend.reference import run_deploy


def _model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = {
        "conv/w": rng.normal(0, 0.4, (4, 2, 3, 3)).astype(np.float32),  # '/' is no file-name character
        "conv/b": rng.normal(0, 0.1, (4,)).astype(np.float32),
        "fc.w": rng.normal(0, 0.3, (64, 5)).astype(np.float32),
        "fc.b": rng.normal(0, 0.1, (5,)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv/w", "conv/b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(save, "PER_INITIALIZER_FROM", 0)  # every model counts as >= 2 GB


def _quantize(model: Path, out: Path, calib: Path) -> None:
    onnxcomp.quantize(model, out, calibration=calib, target="ascend", reports=False)


def _check_split(out: Path, x: np.ndarray, fake_quant: Path, record: Path) -> list[str]:
    """Every initializer of ``out`` in its own file (safe name, right length); deploy == fake-quant; the locations."""
    header = onnx.load(out, load_external_data=False)
    locations = []
    for tensor in header.graph.initializer:
        assert tensor.data_location == TensorProto.EXTERNAL and not tensor.HasField("raw_data"), tensor.name
        info = {e.key: e.value for e in tensor.external_data}
        assert "/" not in info["location"] and info["location"].startswith(f"{out.name}.")
        assert (out.parent / info["location"]).stat().st_size == int(info["length"])
        locations.append(info["location"])
    assert len(set(locations)) == len(locations) == len(header.graph.initializer)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fake = ort.InferenceSession(str(fake_quant), so, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(run_deploy(str(out), {"x": x})[0], fake.run(None, {"x": x})[0])
    assert record_mismatches(onnx.load(out), parse_record(record.read_text())) == []
    return locations


def test_save_deploy_splits_a_large_model_into_one_file_per_initializer(forced: None, tmp_path: Path) -> None:
    model = _model(tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(0.2, 1.0, (32, 2, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    onnxcomp.quantize(model, tmp_path / "q.onnx", calibration=tmp_path / "calib.npz", target="ascend", reports=False)
    deploy = onnx.load(tmp_path / "q.onnx")
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        written = save.save_deploy(deploy, tmp_path / run / "d.onnx")
        assert written[0] == tmp_path / run / "d.onnx" and len(written) == 1 + len(deploy.graph.initializer)
    locations = _check_split(tmp_path / "a" / "d.onnx", x, tmp_path / "q.fake_quant.onnx", tmp_path / "q.record.txt")
    assert "d.onnx.conv_w.quant" in locations  # 'conv/w' -> conv_w, then the '.quant' of the int8 weight
    for name in ["d.onnx", *locations]:  # deterministic: the same bytes in every file
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    assert all(t.HasField("raw_data") for t in deploy.graph.initializer)  # the caller's model is left as it was
    (tmp_path / "a" / "d.onnx").unlink()  # an existing data file is not overwritten without --force
    with pytest.raises(OnnxCompError, match=r"d\.onnx\.conv_w\.quant: already exists"):
        save.save_deploy(deploy, tmp_path / "a" / "d.onnx")
    save.save_deploy(deploy, tmp_path / "a" / "d.onnx", overwrite=True)
    # below the threshold (or external_data=False): one file
    save.save_deploy(deploy, tmp_path / "one.onnx", external_data=False)
    assert not any(p.name.startswith("one.onnx.") for p in tmp_path.iterdir())


def test_initializer_file_names_are_safe_unique_and_stable() -> None:
    tensors = [numpy_helper.from_array(np.zeros(1, np.float32), n) for n in ("a/b", "A:b", "a_b", "", "x.y")]
    model = helper.make_model(helper.make_graph([], "g", [], [], tensors))
    assert save.initializer_files(model, "m.onnx") == {
        "a/b": "m.onnx.a_b",
        "A:b": "m.onnx.A_b.1",  # a_b is taken, also on a case-insensitive file system
        "a_b": "m.onnx.a_b.2",
        "": "m.onnx.tensor",
        "x.y": "m.onnx.x.y",
    }
