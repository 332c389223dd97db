"""The distill pass end to end: onnxruntime figures of distilled vs round-to-nearest models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcomp import distill, quantize
from onnxcomp.errors import OnnxCompError, RecipeError
from onnxcomp.testing import run_model

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO = MODELS / "digits_cnn.onnx"
FAST = {"iters": 80, "batch_rows": 512, "reports": False}


def _demo_data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    calib = {"input": np.load(MODELS / "digits_calib.npz")["input"][:64]}
    held = {"input": np.load(MODELS / "digits_heldout.npz")["input"][:256]}
    return calib, held


def _rel_err(model: onnx.ModelProto, ref: np.ndarray, feeds: dict[str, np.ndarray]) -> float:
    out = run_model(model, feeds, level="disable")[0]
    return float(np.sum((out - ref) ** 2) / np.sum(ref**2))


def _encoder(seed: int = 0) -> onnx.ModelProto:
    """x (B, 8, 64) -> MatMul + bias -> Gelu -> MatMul + bias -> Relu -> MatMul: a transformer-like MLP."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 96)) * 0.15).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(96) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((96, 64)) * 0.12).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(64) * 0.1).astype(np.float32), "b2"),
        numpy_helper.from_array((rng.standard_normal((64, 48)) * 0.12).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Gelu", ["a1"], ["g1"], name="gelu"),
        helper.make_node("MatMul", ["g1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["a2"], name="fc2_bias"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 8, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 8, 48])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_w4a8_demo_beats_round_to_nearest(tmp_path: Path) -> None:
    calib, held = _demo_data()
    ref = run_model(onnx.load(str(DEMO)), held, level="disable")[0]
    kw = {"weights": "int4", "activations": "int8", "placement": "all", "calibration": calib}
    rtn = quantize(DEMO, **kw, reports=False).model
    out = tmp_path / "d.onnx"
    report = distill(DEMO, out, **kw, **FAST)
    record = report.result("distill").data["record"]
    distilled = [e for e in record if e.get("distill", {}).get("kept") == "distilled"]
    assert len(distilled) >= 5  # the four convs and the Gemms
    for e in distilled:
        assert e["distill"]["error_after"] <= e["distill"]["error_before"]
        assert e["weights"]["algorithm"]["name"] == "distill"
    e_rtn, e_dist = _rel_err(rtn, ref, held), _rel_err(report.model, ref, held)
    assert e_dist < 0.7 * e_rtn, (e_rtn, e_dist)  # held-out data, whole model
    saved = json.loads((tmp_path / "d.quant_record.json").read_text())
    assert {e["node"] for e in saved} >= {e["node"] for e in distilled}


@pytest.mark.parametrize(
    "settings",
    [
        {"weights": "int4", "granularity": "channel"},
        {"weights": "int8", "granularity": "channel"},
        {"weights": "fp4_e2m1", "granularity": "group:32"},
        {"weights": "mxfp4"},
    ],
    ids=lambda s: s["weights"],
)
def test_weight_only_formats_beat_round_to_nearest(settings: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    model = _encoder()
    rng = np.random.default_rng(1)
    calib = {"x": rng.standard_normal((32, 8, 64)).astype(np.float32)}
    held = {"x": rng.standard_normal((32, 8, 64)).astype(np.float32)}
    ref = run_model(model, held, level="disable")[0]
    kw = {**settings, "activations": "none", "weight_only_format": "dq", "calibration": calib}
    rtn = quantize(model, **kw, reports=False).model
    out, sim = tmp_path / "d.onnx", tmp_path / "sim.onnx"
    report = distill(model, out, simulation_output=sim, **kw, **FAST)
    e_rtn, e_dist = _rel_err(rtn, ref, held), _rel_err(report.model, ref, held)
    assert e_dist <= e_rtn, (e_rtn, e_dist)
    record = {e["node"]: e for e in report.result("distill").data["record"]}
    assert all(record[n]["distill"]["kept"] in ("distilled", "rtn") for n in ("fc1", "fc2", "fc3"))
    assert record["fc1"]["distill"]["block"] == ["MatMul", "Gelu"]  # the bias Add is the layer's bias
    # deployed == simulation (same learned numbers through DequantizeLinear and as float weights)
    deployed = run_model(onnx.load(str(out)), held, level="disable")[0]
    simulated = run_model(onnx.load(str(sim)), held, level="disable")[0]
    np.testing.assert_allclose(deployed, simulated, rtol=1e-5, atol=1e-5 * np.abs(simulated).max())


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    model = _encoder(3)
    calib = {"x": np.random.default_rng(2).standard_normal((16, 8, 64)).astype(np.float32)}
    kw = {"weights": "int4", "activations": "none", "calibration": calib, "iters": 40, "reports": False}
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    distill(model, a, **kw)
    distill(model, b, **kw)
    assert a.read_bytes() == b.read_bytes()


def test_needs_calibration_and_rejects_gptq() -> None:
    with pytest.raises(OnnxCompError, match="calibration data"):
        distill(_encoder(), weights="int4", activations="none")
    with pytest.raises(RecipeError, match="gptq"):
        distill(_encoder(), weights="int4", activations="none", weight_algorithm="gptq")


def test_input_file_is_not_modified(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_encoder(), str(path))
    before = path.read_bytes()
    calib = {"x": np.random.default_rng(2).standard_normal((8, 8, 64)).astype(np.float32)}
    distill(path, tmp_path / "o.onnx", weights="int4", activations="none", calibration=calib, iters=10)
    assert path.read_bytes() == before


def test_teacher_input_and_combined_compression(tmp_path: Path) -> None:
    """Teacher inputs, equalization + SmoothQuant first, and a 2:4 model whose zeros stay exactly zero."""
    from onnxcomp import sparsify

    calib, held = _demo_data()
    ref = run_model(onnx.load(str(DEMO)), held, level="disable")[0]
    sparse = sparsify(DEMO, tmp_path / "s.onnx", pattern="2:4", method="magnitude").model
    kw = {"weights": "int4", "activations": "uint8", "placement": "all", "calibration": calib, **FAST}
    rtn = quantize(sparse, weights="int4", activations="uint8", placement="all", calibration=calib, reports=False)
    out = distill(sparse, teacher_input=True, equalize=True, smoothquant=0.5, **kw)
    record = out.result("distill").data["record"]
    assert any(e.get("algorithms") for e in record)  # equalization / SmoothQuant ran before distilling
    assert sum(e.get("distill", {}).get("kept") == "distilled" for e in record) >= 3
    assert _rel_err(out.model, ref, held) < _rel_err(rtn.model, ref, held)
    # the 2:4 pattern survives: no pruned weight became non-zero
    patterns = {e["node"]: e["weights"]["sparsity"]["pattern"] for e in rtn.result("quantize").data["record"]}
    assert sum(p == "2:4" for p in patterns.values()) >= 3
    for e in record:
        if patterns.get(e["node"]) == "2:4":
            assert e["weights"]["sparsity"]["pattern"] == "2:4", e["node"]


def test_stash_spills_to_a_memory_mapped_file(tmp_path: Path) -> None:
    from onnxcomp.quant.distill.driver import _Stash

    stash = _Stash([1000], tmp_path)
    parts = [np.full((3, 50), i, np.float32) for i in range(4)]
    for p in parts:
        stash.add(p)
    got = stash.array()
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, np.concatenate(parts))


def _decoder(seed: int = 0) -> onnx.ModelProto:
    """x (B, 4, 8, 8) -> Conv 3x3 + Relu -> ConvTranspose stride 2 (grouped) + LeakyRelu -> Conv 1x1."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 4, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((16, 4, 3, 3)) * 0.2).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b2"),
        numpy_helper.from_array((rng.standard_normal((6, 8, 1, 1)) * 0.3).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "ConvTranspose", ["r1", "w2", "b2"], ["t2"], name="up", strides=[2, 2], pads=[1, 1, 0, 0], group=2
        ),
        helper.make_node("LeakyRelu", ["t2"], ["l2"], name="leaky", alpha=0.1),
        helper.make_node("Conv", ["l2", "w3"], ["y"], name="conv3"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 4, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_transpose_block_end_to_end(tmp_path: Path) -> None:
    model = _decoder()
    rng = np.random.default_rng(4)
    calib = {"x": rng.standard_normal((16, 4, 8, 8)).astype(np.float32)}
    held = {"x": rng.standard_normal((16, 4, 8, 8)).astype(np.float32)}
    ref = run_model(model, held, level="disable")[0]
    kw = {"weights": "int4", "activations": "none", "placement": "all", "calibration": calib}
    kw["config"] = {"ops": ["Conv", "ConvTranspose"]}
    rtn = quantize(model, **kw, reports=False).model
    out, sim = tmp_path / "d.onnx", tmp_path / "sim.onnx"
    report = distill(model, out, simulation_output=sim, **kw, **FAST)
    record = {e["node"]: e for e in report.result("distill").data["record"]}
    assert record["up"]["distill"]["block"] == ["ConvTranspose", "LeakyRelu"]
    assert record["up"]["distill"]["kept"] == "distilled"
    assert _rel_err(report.model, ref, held) < _rel_err(rtn, ref, held)
    deployed = run_model(onnx.load(str(out)), held, level="disable")[0]
    simulated = run_model(onnx.load(str(sim)), held, level="disable")[0]
    np.testing.assert_allclose(deployed, simulated, rtol=1e-5, atol=1e-5 * np.abs(simulated).max())


@pytest.mark.parametrize(
    "storage", [{"fp4_storage": "uint4_lut"}, {"scale_format": "fp8_e4m3", "granularity": "group:16"}], ids=str
)
def test_table_and_two_level_storages_end_to_end(tmp_path: Path, storage: dict[str, str]) -> None:
    """FP4 as uint4 codes + table, and two-level FP4 scales: distilled in their own storage (better
    than round-to-nearest on held-out data; the deployed model equals the simulation model)."""
    rng = np.random.default_rng(5)
    calib = {"x": rng.standard_normal((16, 8, 64)).astype(np.float32)}
    held = {"x": rng.standard_normal((16, 8, 64)).astype(np.float32)}
    model = _encoder()
    ref = run_model(model, held, level="disable")[0]
    kw = {"weights": "fp4_e2m1", "activations": "none", "calibration": calib, "weight_only_format": "dq", **storage}
    out, sim = tmp_path / "d.onnx", tmp_path / "sim.onnx"
    report = distill(model, out, simulation_output=sim, **kw, **FAST)
    record = report.result("distill").data["record"]
    assert record and all(e["distill"]["kept"] == "distilled" for e in record), [e["distill"] for e in record]
    rtn = quantize(model, **kw, reports=False).model
    assert _rel_err(report.model, ref, held) < _rel_err(rtn, ref, held)  # held-out data, the whole model
    deployed = run_model(onnx.load(str(out)), held, level="disable")[0]
    simulated = run_model(onnx.load(str(sim)), held, level="disable")[0]
    np.testing.assert_allclose(deployed, simulated, rtol=1e-5, atol=1e-5 * np.abs(simulated).max())


def test_hif8_weights_and_activations(tmp_path: Path) -> None:
    model = _encoder(1)
    rng = np.random.default_rng(6)
    calib = {"x": rng.standard_normal((16, 8, 64)).astype(np.float32)}
    held = {"x": rng.standard_normal((16, 8, 64)).astype(np.float32)}
    ref = run_model(model, held, level="disable")[0]
    kw = {"weights": "hif8", "activations": "hif8", "calibration": calib}
    out, sim = tmp_path / "d.onnx", tmp_path / "sim.onnx"
    report = distill(model, out, simulation_output=sim, **kw, **FAST)
    blocks = [e["distill"] for e in report.result("distill").data["record"]]
    assert all(b["kept"] == "distilled" and b["error_after"] <= b["error_before"] for b in blocks)
    # 8-bit HiF8: round-to-nearest is already close; distillation stays within a few percent of it on held-out data
    assert _rel_err(report.model, ref, held) <= 1.2 * _rel_err(quantize(model, **kw, reports=False).model, ref, held)
    deployed = run_model(onnx.load(str(out)), held, level="disable")[0]
    simulated = run_model(onnx.load(str(sim)), held, level="disable")[0]
    np.testing.assert_allclose(deployed, simulated, rtol=1e-5, atol=1e-5 * np.abs(simulated).max())
