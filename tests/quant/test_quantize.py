"""The quantize pass: scales per granularity, emission that ORT runs and fuses, demo accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.analysis.metrics import accuracy, predict
from onnxcomp.api import quantize
from onnxcomp.cli.main import main
from onnxcomp.errors import RecipeError
from onnxcomp.framework.registry import make_pass
from onnxcomp.ir import weight_layout
from onnxcomp.quant.spec import Granularity, TensorSpec
from onnxcomp.quant.weights import quantize_weight
from onnxcomp.testing import op_counts, run_model

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO = MODELS / "digits_cnn.onnx"


def _demo_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    held = np.load(MODELS / "digits_heldout.npz")
    calib = np.load(MODELS / "digits_calib.npz")["input"]
    return held["input"], held["label"], calib


def _optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> dict[str, int]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(str(tmp_path / "optimized.onnx")))


# --- scales against the spec -----------------------------------------------------------------


def test_per_channel_symmetric_int8_scale() -> None:
    w = np.random.default_rng(0).standard_normal((6, 4, 3, 3)).astype(np.float32)
    qw = quantize_weight(w, TensorSpec("int8", Granularity("channel")), weight_layout("Conv", 4))
    np.testing.assert_array_equal(qw.scale, (np.abs(w).reshape(6, -1).max(1) / 127).astype(np.float32))
    assert qw.axis == 0 and qw.zero_point.dtype == np.int8 and not qw.zero_point.any()
    np.testing.assert_array_equal(qw.dequantized, qw.codes.astype(np.float32) * qw.scale[:, None, None, None])


def test_per_tensor_asymmetric_int8_matches_spec_example() -> None:
    w = np.array([[-1.0, 3.0], [0.5, 2.0]], np.float32)  # range [-1, 3]
    qw = quantize_weight(w, TensorSpec("int8", Granularity("tensor"), symmetric=False), weight_layout("MatMul", 2))
    assert qw.scale.shape == () and np.isclose(qw.scale, 4 / 255) and int(qw.zero_point) == -64
    assert qw.codes[0, 1] == 127 and qw.codes[0, 0] == -128


@pytest.mark.parametrize(
    ("op", "shape", "axis"), [("MatMul", (70, 5), 0), ("Gemm-T", (5, 70), 1), ("Conv", (4, 70, 1, 1), 1)]
)
def test_per_group_scales_along_reduction_axis(op: str, shape: tuple[int, ...], axis: int) -> None:
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    layout = weight_layout("Gemm", 2, trans_b=True) if op == "Gemm-T" else weight_layout(op, len(shape))
    qw = quantize_weight(w, TensorSpec("int4", Granularity("group", 32)), layout)
    assert qw.axis == axis and qw.block_size == 32
    assert qw.scale.shape[axis] == 3  # ceil(70 / 32): the last group is short
    moved = np.moveaxis(w, axis, 0)
    for g in range(3):
        block = moved[g * 32 : (g + 1) * 32]
        expect = (np.abs(block).max(axis=0) / 7).astype(np.float32)
        np.testing.assert_array_equal(np.moveaxis(qw.scale, axis, 0)[g], expect)
    codes = qw.codes.astype(np.int8)
    assert codes.min() >= -8 and codes.max() <= 7


def test_fp8_per_channel_scale_is_amax_over_448() -> None:
    w = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)
    qw = quantize_weight(w, TensorSpec("fp8_e4m3", Granularity("channel")), weight_layout("Gemm", 2, trans_b=True))
    np.testing.assert_array_equal(qw.scale, (np.abs(w).max(1) / 448).astype(np.float32))


def test_mse_weight_observer_never_worse_than_minmax() -> None:
    rng = np.random.default_rng(3)
    w = rng.laplace(size=(16, 256)).astype(np.float32)
    w[0, 0] = 40.0  # an outlier
    layout = weight_layout("Gemm", 2, trans_b=True)
    plain = quantize_weight(w, TensorSpec("int4", Granularity("channel")), layout)
    searched = quantize_weight(w, TensorSpec("int4", Granularity("channel"), observer="mse"), layout)
    err_plain = ((plain.dequantized - w) ** 2).sum(1)
    err_mse = ((searched.dequantized - w) ** 2).sum(1)
    assert (err_mse <= err_plain).all() and err_mse[1:].sum() < 0.8 * err_plain[1:].sum()


# --- config errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weights": {"dtype": "int8", "granularity": "token"}}, "per-token granularity is for activations"),
        ({"activations": {"dtype": "int8", "granularity": "group:32"}}, "group granularity is for weights"),
        ({"activations": {"dtype": "fp8_e4m3", "symmetric": False}}, "float format and is always symmetric"),
        ({"weights": "int3"}, "unknown format 'int3'; known formats: int8"),
        ({"activations": {"dtype": "int8", "observer": "magic"}}, "activation observer 'magic' unknown"),
        ({"op_types": {"Relu": {"weights": "int8"}}}, "'Relu' is not a quantizable op"),
        ({"weights": {"dtype": "int8", "granularity": "group:7"}}, "bad group size"),
    ],
)
def test_invalid_config_is_an_error(options: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        make_pass("quantize", options)


# --- emission on a small model ----------------------------------------------------------------


def _mlp(k: int = 64, n: int = 48, shared: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.2, "w1"),
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((n, k)).astype(np.float32) * 0.2, "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", "w1"], ["z"], name="mm_shared"))
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", k])]
    if shared:
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", n]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])], outs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int4_weight_only_dq_form_and_the_fusedgemm_trap(tmp_path: Path) -> None:
    """The DequantizeLinear form (other runtimes): ORT fuses MatMul+bias before MatMulNBits."""
    model = _mlp()
    report = quantize(
        model, weights="int4", granularity="group:32", activations="none", fuse=False, weight_only_format="dq"
    )
    out = report.model
    assert out.opset_import[0].version == 21 and "converted opset 17 -> 21 for quantize" in report.notes
    assert op_counts(out)["DequantizeLinear"] == 2
    # mm2 fuses into MatMulNBits; mm1 is followed by a bias Add, which ORT 1.32 fuses first
    # (MatMul+Add -> FusedGemm with a run-time DQ): a known trap, documented in the README.
    ops = _optimized_ops(out, tmp_path)
    assert ops.get("MatMulNBits") == 1 and ops.get("FusedGemm") == 1
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    disabled, full = run_model(out, {"x": x}, level="disable")[0], run_model(out, {"x": x}, level="all")[0]
    ref = run_model(model, {"x": x})[0]
    np.testing.assert_allclose(full, disabled, rtol=0.02, atol=0.02)  # MatMulNBits re-quantizes activations
    assert np.corrcoef(disabled.ravel(), ref.ravel())[0, 1] > 0.98  # int4 on a random 2-layer MLP: 0.987


def test_int4_weight_only_matmul_with_bias_runs_as_matmulnbits(tmp_path: Path) -> None:
    """Written directly as MatMulNBits with the bias folded in: every weight-only MatMul keeps the kernel."""
    model = _mlp()
    out = quantize(model, weights="int4", granularity="group:32", activations="none", fuse=False).model
    assert op_counts(out) == {"MatMulNBits": 2, "Relu": 1}
    first = next(n for n in out.graph.node if n.name == "mm1")
    assert len(first.input) == 6 and first.input[5]  # bias input, the Add is gone
    assert _optimized_ops(out, tmp_path).get("MatMulNBits") == 2
    dq = quantize(
        model, weights="int4", granularity="group:32", activations="none", fuse=False, weight_only_format="dq"
    ).model
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    exact = quantize(
        model,
        weights="int4",
        granularity="group:32",
        activations="none",
        fuse=False,
        config={"matmulnbits_accuracy_level": 0},
    ).model
    np.testing.assert_allclose(
        run_model(exact, {"x": x})[0], run_model(dq, {"x": x}, level="disable")[0], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        run_model(out, {"x": x})[0], run_model(dq, {"x": x}, level="disable")[0], rtol=0.02, atol=0.02
    )


@pytest.mark.parametrize("form", ["dq", "matmulnbits"])
def test_shared_weight_is_quantized_once(form: str) -> None:
    out = quantize(_mlp(shared=True), weights="int8", activations="none", fuse=False, weight_only_format=form).model
    if form == "dq":
        dq_inputs = [n.input[0] for n in out.graph.node if n.op_type == "DequantizeLinear"]
        assert sorted(dq_inputs) == ["w1_quantized", "w2_quantized"]
    else:
        users = [n.input[1] for n in out.graph.node if n.op_type == "MatMulNBits"]
        assert len(users) == 3 and len(set(users)) == 2  # mm1 and mm_shared read one packed w1


def test_determinism_same_bytes(tmp_path: Path) -> None:
    _, _, calib = _demo_data()
    a = quantize(DEMO, calibration={"input": calib[:32]}).model.SerializeToString()
    b = quantize(DEMO, calibration={"input": calib[:32]}).model.SerializeToString()
    assert a == b


# --- the demo model, W8A8 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_w8a8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, onnx.ModelProto]:
    tmp = tmp_path_factory.mktemp("w8a8")
    out = tmp / "demo_int8.onnx"
    assert (
        main(
            [
                "-q",
                "quantize",
                str(DEMO),
                "-o",
                str(out),
                "--calib",
                str(MODELS / "digits_calib.npz"),
                "--simulation",
                str(tmp / "demo_sim.onnx"),
            ]
        )
        == 0
    )
    return out, onnx.load(str(out))


def test_demo_w8a8_accuracy_within_half_a_point(demo_w8a8: tuple[Path, onnx.ModelProto]) -> None:
    images, labels, _ = _demo_data()
    fp32 = accuracy(predict(onnx.load(str(DEMO)), {"input": images}), labels)
    q = accuracy(predict(demo_w8a8[1], {"input": images}), labels)
    assert q >= fp32 - 0.5, (fp32, q)


def test_demo_int8_convs_become_qlinearconv(demo_w8a8: tuple[Path, onnx.ModelProto], tmp_path: Path) -> None:
    ops = _optimized_ops(demo_w8a8[1], tmp_path)
    assert ops.get("QLinearConv", 0) == 4, ops
    assert "BatchNormalization" not in ops


def test_demo_disable_all_and_all_agree(demo_w8a8: tuple[Path, onnx.ModelProto]) -> None:
    images, _, _ = _demo_data()
    model = demo_w8a8[1]
    onnx.checker.check_model(model, full_check=True)
    a = predict(model, {"input": images[:64]}, level="disable")
    b = predict(model, {"input": images[:64]}, level="all")
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * np.abs(a).max())
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.98


def test_demo_record_and_report_beside_output(demo_w8a8: tuple[Path, onnx.ModelProto]) -> None:
    path = demo_w8a8[0]
    record = json.loads(path.with_name("demo_int8.quant_record.json").read_text())
    report = json.loads(path.with_name("demo_int8.quant_report.json").read_text())
    assert {r["op"] for r in record} == {"Conv", "Gemm"} and len(record) == 6
    conv = next(r for r in record if r["node"] == "conv1")
    assert conv["weights"]["dtype"] == "int8" and conv["weights"]["granularity"] == "channel"
    assert len(conv["weights"]["scale"]) == 16 and conv["activations"][0]["range"][0] < 0
    sqnrs = [n["local_sqnr_db"] for n in report["nodes"]]  # sorted by each node's own error
    assert sqnrs == sorted(sqnrs) and len(sqnrs) == 6 and min(sqnrs) > 10
    assert report["outputs"][0]["cosine"] > 0.99
    assert (path.parent / "demo_sim.onnx").exists()


def test_int32_bias_on_fully_int8_conv(demo_w8a8: tuple[Path, onnx.ModelProto]) -> None:
    inits = {t.name: t for t in demo_w8a8[1].graph.initializer}
    biases = [
        t for n, t in inits.items() if n.endswith("bias_quantized") or "bias" in n and t.data_type == TensorProto.INT32
    ]
    assert biases and all(t.data_type == TensorProto.INT32 for t in biases)


def test_output_mse_observer_lowers_layer_output_error() -> None:
    """With uneven input-channel energy, weighting the search by E[x^2] lowers the output error."""
    rng = np.random.default_rng(7)
    k, n = 128, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    gains = np.exp(rng.uniform(-3, 3, k)).astype(np.float32)  # input channels of very different energy
    calib = [{"x": (rng.standard_normal((64, k)) * gains).astype(np.float32)} for _ in range(4)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.concatenate([b["x"] for b in calib])
    errors = {}
    for observer in ("minmax", "mse", "output_mse"):
        q = quantize(
            model,
            calibration=calib,
            weights="int4",
            granularity="channel",
            activations="none",
            weight_observer=observer,
            fuse=False,
        ).model
        errors[observer] = float(((run_model(q, {"x": x}, level="disable")[0] - x @ w) ** 2).mean())
    assert errors["output_mse"] < errors["mse"] <= errors["minmax"], errors
