"""Low-bit formats in the graph: emitted subgraphs are bit-exact with the codecs in onnxruntime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcomp import ir
from onnxcomp.analysis.inspect import weight_storage
from onnxcomp.api import quantize
from onnxcomp.formats import get_format
from onnxcomp.quant.activation_subgraphs import (
    emit_cast_activation,
    emit_hif8_activation,
    emit_mx_activation,
)
from onnxcomp.testing import run_model

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO = MODELS / "digits_cnn.onnx"


def _values_equal(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Equal values (+0 == -0; NaN == NaN): integer re-encodings of float codes cannot keep -0."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return (got == want) | (np.isnan(got) & np.isnan(want))


def _bits_equal(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))


# --- weights -------------------------------------------------------------------------------------

K, N = 80, 24  # K = 2.5 groups of 32: a short last group / zero-padded MX block


def _weight() -> np.ndarray:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * np.exp(rng.uniform(-3, 3, (1, N)))).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero column (scale 1 / X = -127)
    w[5, 1], w[40, 1] = 1e4, -1e-6  # an outlier and a tiny value in one column
    w[:3, 2] = [1.0625, 1.9375, 15.5]  # HiF8 / E1M2 ties at scale 1 (column amax below)
    return w


def _matmul(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _group_reference(w: np.ndarray, fmt_name: str, group: int, target: float) -> np.ndarray:
    """Codec reference: per-group (along K) scale = amax / target, x' = s * qdq(x / s)."""
    fmt = get_format(fmt_name)
    out = np.empty_like(w)
    for start in range(0, K, group):
        block = w[start : start + group]
        amax = np.abs(block).max(axis=0, keepdims=True).astype(np.float64)
        s = np.where(amax > 0, amax / target, 1.0).astype(np.float32)
        s = np.maximum(s, np.finfo(np.float32).tiny)
        out[start : start + group] = fmt.quantize_dequantize(np.divide(block, s, dtype=np.float32)) * s
    return out


def _channel_reference(w: np.ndarray, fmt_name: str, target: float) -> np.ndarray:
    return _group_reference(w, fmt_name, K, target)


WEIGHT_CASES: list[tuple[str, str, Callable[[np.ndarray], np.ndarray], str]] = [
    ("hif8", "channel", lambda w: _channel_reference(w, "hif8", 16.0), "int8"),
    ("fp8_e4m3", "channel", lambda w: _channel_reference(w, "fp8_e4m3", 448.0), "int8"),
    ("fp4_e2m1", "group:32", lambda w: _group_reference(w, "fp4_e2m1", 32, 6.0), "int8"),
    ("fp4_e2m1", "group:64", lambda w: _group_reference(w, "fp4_e2m1", 64, 6.0), "uint4_lut"),
    ("fp4_e1m2", "group:32", lambda w: _group_reference(w, "fp4_e1m2", 32, 1.75), "int8"),
    ("fp4_e1m2", "channel", lambda w: _channel_reference(w, "fp4_e1m2", 1.75), "int8"),
    ("mxfp8", "group:32", lambda w: get_format("mxfp8").quantize_dequantize(w, axis=0), "int8"),
    ("mxfp4", "group:32", lambda w: get_format("mxfp4").quantize_dequantize(w, axis=0), "int8"),
    ("mxfp4", "group:32", lambda w: get_format("mxfp4").quantize_dequantize(w, axis=0), "uint4_lut"),
]


@pytest.mark.parametrize(("fmt", "granularity", "reference", "storage"), WEIGHT_CASES)
def test_weight_dequant_subgraph_is_bit_exact(fmt: str, granularity: str, reference: Callable, storage: str) -> None:
    w = _weight()
    model = quantize(
        _matmul(w),
        weights=fmt,
        granularity=granularity,
        activations="none",
        fuse=False,
        fp4_storage=storage,
        weight_only_format="dq",
    ).model
    eye = np.eye(K, dtype=np.float32)  # x = I: the output is the dequantized weight, exactly
    got = run_model(model, {"x": eye}, level="disable")[0]
    want = reference(w)
    assert _values_equal(got, want).all(), (fmt, np.argwhere(~_values_equal(got, want))[:5])


NBITS_CASES = [c for c in WEIGHT_CASES if c[0] in ("fp4_e2m1", "fp4_e1m2", "mxfp4") and c[3] == "int8"]


@pytest.mark.parametrize(("fmt", "granularity", "reference", "storage"), NBITS_CASES)
def test_matmulnbits_weights_are_bit_exact(fmt: str, granularity: str, reference: Callable, storage: str) -> None:
    """The packed MatMulNBits form (float compute, accuracy level 0) dequantizes to the codec's values."""
    w = _weight()
    out = quantize(
        _matmul(w),
        weights=fmt,
        granularity=granularity,
        activations="none",
        fuse=False,
        config={"matmulnbits_accuracy_level": 0},
    ).model
    assert [n.op_type for n in out.graph.node] == ["MatMulNBits"]
    got = run_model(out, {"x": np.eye(K, dtype=np.float32)}, level="disable")[0]
    want = reference(w)
    assert _values_equal(got, want).all(), (fmt, np.argwhere(~_values_equal(got, want))[:5])


def test_fp4_standard_types_run_in_onnx_reference() -> None:
    w = _weight()
    std = quantize(_matmul(w), weights="fp4_e2m1", activations="none", fuse=False, fp4_storage="float4e2m1").model
    assert std.opset_import[0].version == 23
    assert any(t.data_type == TensorProto.FLOAT4E2M1 for t in std.graph.initializer)
    got = ReferenceEvaluator(std).run(None, {"x": np.eye(K, dtype=np.float32)})[0]
    assert _values_equal(got, _group_reference(w, "fp4_e2m1", 32, 6.0)).all()


def test_storage_bits() -> None:
    w = _weight()
    sizes = {}
    for fmt, storage in (("fp4_e1m2", "int8"), ("fp4_e2m1", "int8"), ("fp4_e2m1", "uint4_lut"), ("mxfp4", "int8")):
        model = quantize(
            _matmul(w), weights=fmt, activations="none", fuse=False, fp4_storage=storage, weight_only_format="dq"
        ).model
        (entry,) = weight_storage(model).values()
        sizes[(fmt, storage)] = entry["bits"] / entry["weights"]
    # 4-bit codes + one fp32 scale and a 4/8-bit zero point per 32 weights (the 3rd group is short)
    assert sizes[("fp4_e1m2", "int8")] < 5.5 and sizes[("fp4_e2m1", "uint4_lut")] < 5.7
    assert 8 < sizes[("fp4_e2m1", "int8")] < 9.6 and 8 < sizes[("mxfp4", "int8")] < 9.6


# --- activations ---------------------------------------------------------------------------------


def _activation_model(width: int, emit: Callable[[ir.Graph, ir.Tensor], ir.Tensor], opset: int = 21) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "act",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    g = ir.import_model(model)
    g.nodes[0].inputs[0] = emit(g, g.inputs[0])
    ir.finalize(g)
    return ir.export_model(g, model)


def _hard_inputs(fmt: str, width: int) -> np.ndarray:
    """Every fp16 and bf16 bit pattern, every representable value and midpoint (+-1 ulp), specials."""
    values = get_format(fmt).values.astype(np.float64)
    mids = ((values[1:] + values[:-1]) / 2).astype(np.float32)
    parts = [
        np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32),
        (np.arange(65536, dtype=np.uint32) << 16).view(np.float32),
        values.astype(np.float32),
        mids,
        np.nextafter(mids, np.float32(np.inf)),
        np.nextafter(mids, np.float32(-np.inf)),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3e38], np.float32),
    ]
    data = np.concatenate(parts)
    data = np.concatenate([data, np.zeros((-len(data)) % width, np.float32)])
    return data.reshape(-1, width)


def _assert_exact(model: onnx.ModelProto, x: np.ndarray, want: np.ndarray) -> None:
    for level in ("disable", "all"):
        got = run_model(model, {"x": x}, level=level)[0]
        bad = ~_bits_equal(got, want)
        assert not bad.any(), (level, int(bad.sum()), x[bad][:5], got[bad][:5], want[bad][:5])


def test_hif8_static_activation_is_bit_exact() -> None:
    x = _hard_inputs("hif8", 64)
    model = _activation_model(64, lambda g, t: emit_hif8_activation(g, t, 1.0, "h"))
    _assert_exact(model, x, get_format("hif8").quantize_dequantize(x))


def test_hif8_scaled_static_activation_is_bit_exact() -> None:
    with np.errstate(invalid="ignore"):
        x = _hard_inputs("hif8", 64) * np.float32(0.375)
    s = np.float32(0.125)
    model = _activation_model(64, lambda g, t: emit_hif8_activation(g, t, float(s), "h"))
    with np.errstate(all="ignore"):
        want = get_format("hif8").quantize_dequantize(np.divide(x, s, dtype=np.float32)) * s
    _assert_exact(model, x, want)


def test_hif8_dynamic_per_token_is_bit_exact() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((256, 48)) * np.exp(rng.uniform(-12, 12, (256, 1)))).astype(np.float32)
    x[0] = 0.0
    model = _activation_model(48, lambda g, t: emit_hif8_activation(g, t, None, "h"))
    amax = np.abs(x).max(axis=1, keepdims=True)
    s = np.maximum(amax / np.float32(16.0), np.finfo(np.float32).tiny).astype(np.float32)
    want = get_format("hif8").quantize_dequantize(np.divide(x, s, dtype=np.float32)) * s
    _assert_exact(model, x, want)


@pytest.mark.parametrize("finite", [False, True])
@pytest.mark.parametrize("width", [64, 70])
def test_mxfp8_dynamic_activation_is_bit_exact(width: int, finite: bool) -> None:
    """With a NaN/Inf anywhere the block amax masks them (one If branch); all finite: the other branch."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((300, width)) * np.exp(rng.uniform(-40, 40, (300, 1)))).astype(np.float32)
    x[0] = 0.0
    x[1, :6] = [-0.0, 2.5, -1e-45, 3e38, -3.0, 1e-40] if finite else [np.nan, np.inf, -np.inf, 3e38, -3.0, 1e-40]
    x[2, :3] = [448.0, 464.0, 480.0]  # E4M3 saturation and ties
    model = _activation_model(width, lambda g, t: emit_mx_activation(g, t, width, "mxfp8", "m"))
    _assert_exact(model, x, get_format("mxfp8").quantize_dequantize(x, axis=-1))


def test_fp8_static_activation_is_bit_exact() -> None:
    x = _hard_inputs("fp8_e4m3", 64)
    s = np.float32(0.5)
    model = _activation_model(64, lambda g, t: emit_cast_activation(g, t, float(s), "fp8_e4m3", "f"))
    with np.errstate(all="ignore"):
        want = get_format("fp8_e4m3").quantize_dequantize(np.divide(x, s, dtype=np.float32)) * s
    _assert_exact(model, x, want)


def test_ort_drops_relu_before_fp8_quantizelinear() -> None:
    """Pins the onnxruntime 1.32 bug that makes onnxcomp write FP8 activations as Casts.

    If this starts failing, ORT fixed it: FP8 static activations may go back to Q/DQ.
    """
    import ml_dtypes

    inits = [
        numpy_helper.from_array(np.array(0.01, np.float32), "s"),
        numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), "z"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.array([-1.0, 1.0], np.float32)
    assert run_model(model, {"x": x}, level="disable")[0][0] == 0.0
    assert run_model(model, {"x": x}, level="extended")[0][0] < 0.0  # the Relu is gone


# --- whole models --------------------------------------------------------------------------------

FORMAT_SETTINGS = [
    {"weights": "hif8", "activations": "hif8"},
    {"weights": "hif8", "activations": "hif8", "dynamic": True},
    {"weights": "mxfp8", "activations": "mxfp8"},
    {"weights": "mxfp4", "activations": "none"},
    {"weights": "fp4_e2m1", "activations": "fp8_e4m3"},
    {"weights": "fp4_e1m2", "granularity": "group:32", "activations": "none"},
    {"weights": "fp8_e4m3", "activations": "fp8_e4m3", "dynamic": True},
]


@pytest.mark.parametrize("settings", FORMAT_SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_format_quantizes_the_demo(settings: dict, tmp_path: Path) -> None:
    from onnxcomp.analysis.metrics import accuracy, predict

    held = np.load(MODELS / "digits_heldout.npz")
    calib = {"input": np.load(MODELS / "digits_calib.npz")["input"][:64]}
    out, sim = tmp_path / "q.onnx", tmp_path / "sim.onnx"
    exact = {"matmulnbits_accuracy_level": 0}  # weight-only Gemms become MatMulNBits: float compute, exact
    quantize(DEMO, out, calibration=calib, simulation_output=sim, config=exact, **settings)
    deployed, simulated = onnx.load(str(out)), onnx.load(str(sim))
    x = {"input": held["input"]}
    a, b = predict(deployed, x, level="disable"), predict(deployed, x, level="all")
    c = predict(simulated, x, level="disable")
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * np.abs(c).max())  # deploy == simulation
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.99  # DISABLE_ALL and ALL agree
    np.testing.assert_allclose(a, b, atol=0.02 * np.abs(a).max())
    assert accuracy(a, held["label"]) >= 98.5


def test_mixed_formats_in_one_model() -> None:
    calib = {"input": np.load(MODELS / "digits_calib.npz")["input"][:32]}
    config = {
        "weights": "int8",
        "activations": "hif8",
        "op_types": {"Gemm": {"weights": "mxfp4"}},
        "nodes": {"conv1": {"activations": "none"}},
    }
    report = quantize(DEMO, calibration=calib, config=config)
    record = {r["node"]: r for r in report.result("quantize").data["record"]}
    assert record["fc1"]["weights"]["dtype"] == "mxfp4" and record["conv2"]["weights"]["dtype"] == "int8"
    assert "activations" not in record["conv1"] and record["conv2"]["activations"][0]["dtype"] == "hif8"
    assert record["fc1"]["weights"]["stored_as"] == "int8 (mxfp4 values x2)"


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e1m2"])
def test_two_level_fp8_group_scales_are_exact(fmt: str) -> None:
    """Per-channel fp32 scale, per-group FP8 E4M3 scale, FP4 elements: two chained DQs, exact."""
    w = _weight()
    config = {"weights": {"dtype": fmt, "granularity": "group:32", "scale_format": "fp8_e4m3"}, "activations": "none"}
    report = quantize(_matmul(w), config=config, fuse=False)
    model = report.model
    assert any(t.data_type == TensorProto.FLOAT8E4M3FN for t in model.graph.initializer)
    got = run_model(model, {"x": np.eye(K, dtype=np.float32)}, level="disable")[0]
    fp8, elem = get_format("fp8_e4m3"), get_format(fmt)
    amax_c = np.abs(w).max(0, keepdims=True).astype(np.float64)
    s_c = np.where(amax_c > 0, amax_c / (448 * elem.max_value), 1).astype(np.float32)
    want = np.empty_like(w)
    for start in range(0, K, 32):
        block = w[start : start + 32]
        g = (np.abs(block).max(0, keepdims=True) / (elem.max_value * s_c.astype(np.float64))).astype(np.float32)
        eff = np.multiply(s_c, fp8.quantize_dequantize(g), dtype=np.float32)
        safe = np.where(eff > 0, eff, 1).astype(np.float32)
        want[start : start + 32] = np.where(
            eff > 0, elem.quantize_dequantize(np.divide(block, safe, dtype=np.float32)) * eff, 0
        )
    assert _values_equal(got, want).all()
    assert _values_equal(run_model(model, {"x": np.eye(K, dtype=np.float32)}, level="all")[0], got).all()


def test_two_level_with_fp8_activations_on_the_demo() -> None:
    from onnxcomp.analysis.metrics import accuracy, predict

    held = np.load(MODELS / "digits_heldout.npz")
    calib = {"input": np.load(MODELS / "digits_calib.npz")["input"][:32]}
    config = {
        "weights": {"dtype": "fp4_e2m1", "granularity": "group:32", "scale_format": "fp8_e4m3"},
        "activations": "fp8_e4m3",
    }
    model = quantize(DEMO, calibration=calib, config=config).model
    assert accuracy(predict(model, {"input": held["input"]}), held["label"]) >= 98.5


def test_two_level_storage_counts_group_scales() -> None:
    model = quantize(
        _matmul(_weight()),
        config={
            "weights": {"dtype": "fp4_e1m2", "granularity": "group:32", "scale_format": "fp8_e4m3"},
            "activations": "none",
        },
        fuse=False,
    ).model
    (entry,) = weight_storage(model).values()
    total = sum(
        np.prod(t.dims)
        * (
            4
            if t.data_type == TensorProto.INT4
            else 8
            if t.data_type in (TensorProto.INT8, TensorProto.FLOAT8E4M3FN)
            else 32
        )
        for t in model.graph.initializer
    )
    assert entry["bits"] == total  # codes, FP8 group scales + zero points, fp32 channel scales


def test_two_level_rejects_other_fp4_storage() -> None:
    from onnxcomp.errors import PassError

    with pytest.raises(PassError, match="cannot be combined with two-level scales"):
        quantize(
            _matmul(_weight()),
            config={
                "weights": {"dtype": "fp4_e2m1", "granularity": "group:32", "scale_format": "fp8_e4m3"},
                "activations": "none",
            },
            fuse=False,
            fp4_storage="uint4_lut",
        )


@pytest.mark.parametrize("fmt", ["mxfp8", "hif8", "int8"])
def test_conv_dynamic_activations_scale_along_channels(fmt: str) -> None:
    """Per-token / MX scales of a Conv input run along its channels (the reduction axis)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 40, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 40, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H", "W"])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sim = quantize(model, weights="int8", activations=fmt, dynamic=True, fuse=False, emit="simulate").model
    x = (rng.standard_normal((2, 40, 5, 7)) * np.exp(rng.uniform(-4, 4, (2, 1, 5, 7)))).astype(np.float32)
    wq = numpy_helper.to_array(next(t for t in sim.graph.initializer if t.name.endswith("fakequant")))
    moved = np.moveaxis(x, 1, -1)  # channels last: one scale per pixel (or per 32-channel block)
    if fmt == "mxfp8":
        xq = get_format("mxfp8").quantize_dequantize(moved, axis=-1)
    else:
        top = {"hif8": 16.0, "int8": 127.0}[fmt]
        s = np.maximum(np.abs(moved).max(-1, keepdims=True) / np.float32(top), np.finfo(np.float32).tiny).astype(
            np.float32
        )
        y = np.divide(moved, s, dtype=np.float32)
        xq = (get_format("hif8").quantize_dequantize(y) if fmt == "hif8" else np.clip(np.rint(y), -128, 127)) * s
    ref_model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
            "r",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(wq, "w")],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    want = run_model(
        ref_model, {"x": np.ascontiguousarray(np.moveaxis(xq, -1, 1)).astype(np.float32)}, level="disable"
    )[0]
    got = run_model(sim, {"x": x}, level="disable")[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --- activation subgraphs: more scales, layouts, and their cost ---------------------------------

SCALES = [1.0, 0.375, 3.7, 1e-3, 2.0**-100, 1e-38, 5e25, float(np.finfo(np.float32).max / 448)]


@pytest.mark.parametrize("fmt", ["hif8", "fp8_e4m3"])
@pytest.mark.parametrize("scale", SCALES)
def test_static_activation_is_bit_exact_at_any_scale(fmt: str, scale: float) -> None:
    """Tiny, huge and non-power-of-two scales; the inputs span the scaled range (x / s overflows too)."""
    s = np.float32(scale)
    with np.errstate(all="ignore"):
        x = (_hard_inputs(fmt, 64) * s).astype(np.float32)
        want = get_format(fmt).quantize_dequantize(np.divide(x, s, dtype=np.float32)) * s
    if fmt == "hif8":
        model = _activation_model(64, lambda g, t: emit_hif8_activation(g, t, float(s), "h"))
    else:
        model = _activation_model(64, lambda g, t: emit_cast_activation(g, t, float(s), fmt, "f"))
    _assert_exact(model, x, want)


def _relu_activation_model(width: int, emit: Callable[[ir.Graph, ir.Tensor], ir.Tensor]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
        "act",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    g = ir.import_model(model)
    g.nodes[1].inputs[0] = emit(g, g.nodes[0].outputs[0])
    ir.finalize(g)
    return ir.export_model(g, model)


@pytest.mark.parametrize("scale", [None, 1.0, 0.125])
def test_hif8_after_relu_is_bit_exact(scale: float | None) -> None:
    """A never-negative input (Relu output) gets the subgraph without sign handling: still exact."""
    x = _hard_inputs("hif8", 64)
    model = _relu_activation_model(64, lambda g, t: emit_hif8_activation(g, t, scale, "h"))
    assert not any(n.op_type == "Less" for n in model.graph.node)  # no sign mask
    r = np.maximum(x, 0)
    r[np.isnan(x)] = np.nan
    with np.errstate(all="ignore"):
        if scale is None:
            s = np.maximum(r.max(axis=1, keepdims=True) / np.float32(16.0), np.finfo(np.float32).tiny).astype(
                np.float32
            )
            s[np.isnan(r).any(axis=1)] = np.nan  # the reference amax propagates NaN
            rows = ~np.isnan(r).any(axis=1)  # ORT's ReduceMax need not: compare rows without NaN
            x, r, s = x[rows], r[rows], s[rows]
        else:
            s = np.float32(scale)
        want = get_format("hif8").quantize_dequantize(np.divide(r, s, dtype=np.float32)) * s
    _assert_exact(model, x, want)


@pytest.mark.parametrize("finite", [False, True])
@pytest.mark.parametrize("channels", [3, 32, 40, 64])
def test_mxfp8_activation_along_channels_is_bit_exact(channels: int, finite: bool) -> None:
    """Conv inputs: 32-blocks along axis 1 of NCHW, no transpose; short and split last blocks."""
    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "act",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, "H", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    g = ir.import_model(model)
    g.nodes[0].inputs[0] = emit_mx_activation(g, g.inputs[0], channels, "mxfp8", "m", 1, 4)
    ir.finalize(g)
    model = ir.export_model(g, model)
    assert not any(n.op_type in ("Transpose", "Pad") for n in model.graph.node)
    x = (rng.standard_normal((3, channels, 5, 7)) * np.exp(rng.uniform(-30, 30, (3, 1, 5, 7)))).astype(np.float32)
    x[0, :, 0, 0] = 0.0
    x[0, 0, 1, 1], x[1, -1, 2, 2], x[2, 0, 3, 3] = (2e-45, -3e38, -0.0) if finite else (np.nan, -np.inf, -0.0)
    _assert_exact(model, x, get_format("mxfp8").quantize_dequantize(x, axis=1))


def test_activation_subgraphs_avoid_slow_ops() -> None:
    """Pins the cost design (module docstring of activation_subgraphs): no Gather (8x a
    GatherElements), no FP8 Cast (~7 ns per element each way), no Transpose, no int64 casts."""
    models = [
        _activation_model(64, lambda g, t: emit_hif8_activation(g, t, 0.3, "h")),
        _activation_model(64, lambda g, t: emit_hif8_activation(g, t, None, "h")),
        _activation_model(64, lambda g, t: emit_cast_activation(g, t, 0.3, "fp8_e4m3", "f")),
        _activation_model(70, lambda g, t: emit_mx_activation(g, t, 70, "mxfp8", "m")),
    ]
    for model in models:
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"Gather", "Transpose"}, ops
        for n in model.graph.node:
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            assert to not in (TensorProto.FLOAT8E4M3FN, TensorProto.INT64), n.name
