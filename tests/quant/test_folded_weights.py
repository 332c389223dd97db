"""FP8 / MXFP8 weights in the ``cast`` form: bit-exact with DequantizeLinear, folded by onnxruntime at load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import ir
from onnxcomp.analysis.inspect import weight_storage
from onnxcomp.api import quantize
from onnxcomp.formats import get_format
from onnxcomp.runtime import ort_session
from onnxcomp.testing import run_model

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO = MODELS / "digits_cnn.onnx"
K, N = 80, 24  # K = 2.5 blocks of 32: a short last MX block


def _weight() -> np.ndarray:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * np.exp(rng.uniform(-3, 3, (1, N)))).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero column (MX scale 2^-127)
    w[5, 1], w[40, 1] = 1e4, -1e-6  # an outlier and a tiny value in one column (subnormal codes)
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


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


CASES = [
    ("fp8_e4m3", "channel"),
    ("fp8_e4m3", "tensor"),
    ("fp8_e5m2", "channel"),
    ("fp8_e4m3", "group:32"),
    ("mxfp8", "group:32"),
]


@pytest.mark.parametrize(("fmt", "granularity"), CASES)
def test_cast_form_is_bit_exact_with_dequantize_linear(fmt: str, granularity: str) -> None:
    w = _weight()
    forms = {
        form: quantize(
            _matmul(w),
            weights=fmt,
            granularity=granularity,
            activations="none",
            fuse=False,
            config={"float_weight_format": form},
        ).model
        for form in ("cast", "dq")
    }
    ops = {form: [n.op_type for n in m.graph.node] for form, m in forms.items()}
    assert "DequantizeLinear" in ops["dq"] and "DequantizeLinear" not in ops["cast"], ops
    eye = np.eye(K, dtype=np.float32)  # x = I: the output is the decoded weight itself, at every level
    for level in ("disable", "all"):
        cast = run_model(forms["cast"], {"x": eye}, level=level)[0]
        dq = run_model(forms["dq"], {"x": eye}, level=level)[0]
        assert np.array_equal(_bits(cast), _bits(dq)), (fmt, granularity, level)
    if fmt == "mxfp8":  # and the codec's own decoding (MX blocks along K, the short block zero-padded)
        assert np.array_equal(cast, get_format("mxfp8").quantize_dequantize(w, axis=0))
    x = np.random.default_rng(1).standard_normal((7, K)).astype(np.float32)
    got = run_model(forms["cast"], {"x": x}, level="disable")[0]
    assert np.array_equal(_bits(got), _bits(run_model(forms["dq"], {"x": x}, level="disable")[0]))


def _optimized(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    path = tmp_path / "optimized.onnx"
    ort_session(model, level="all", threads=1, optimized_path=str(path))
    return onnx.load(path)


def _compute_weights_constant(optimized: onnx.ModelProto) -> dict[str, bool]:
    """For every Conv / MatMul / Gemm (plain or fused) of ORT's optimized graph: is its weight an initializer?"""
    inits = {i.name for i in optimized.graph.initializer}
    found = {}
    for n in optimized.graph.node:
        if n.op_type in ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm") and len(n.input) > 1:
            found[n.name] = n.input[1] in inits
    return found


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "mxfp8"])
def test_onnxruntime_folds_the_weights_at_load(fmt: str, tmp_path: Path) -> None:
    """On the demo with emulated activations, ORT's optimized graph runs every Conv/Gemm on a
    constant weight (pre-packed, as in the fp32 model); the DequantizeLinear form leaves run-time DQs."""
    calib = {"input": np.load(MODELS / "digits_calib.npz")["input"][:32]}
    kw = {"weights": fmt, "activations": fmt, "calibration": [calib], "reports": False}
    cast = quantize(DEMO, **kw).model
    dq = quantize(DEMO, **kw, config={"float_weight_format": "dq"}).model
    opt_cast, opt_dq = _optimized(cast, tmp_path), _optimized(dq, tmp_path)
    constant = _compute_weights_constant(opt_cast)
    assert len(constant) >= 5 and all(constant.values()), constant
    assert not any(n.op_type == "DequantizeLinear" for n in opt_cast.graph.node)
    assert sum(n.op_type == "DequantizeLinear" for n in opt_dq.graph.node) >= 5
    # the file keeps the 8-bit codes: the same size as the DequantizeLinear form, within the index constants
    size_cast, size_dq = len(cast.SerializeToString()), len(dq.SerializeToString())
    assert size_cast <= size_dq * 1.02, (size_cast, size_dq)
    assert size_cast < 0.4 * DEMO.stat().st_size
    x = np.load(MODELS / "digits_heldout.npz")["input"][:64]
    # the same decoded weights: outputs differ only by the kernels' summation order
    y_cast, y_dq = run_model(cast, {"input": x}, level="disable")[0], run_model(dq, {"input": x}, level="disable")[0]
    assert np.array_equal(_bits(y_cast), _bits(y_dq))


def test_cast_form_counts_as_quantized_and_as_8_bit_storage() -> None:
    w = _weight()
    # 8-bit codes + a float32 scale per column of 80 (fp8) or per block of up to 32 (mxfp8: 3 per column)
    for fmt, bits in (("fp8_e4m3", (8.4, 8.41)), ("mxfp8", (9.2, 9.21))):
        model = quantize(_matmul(w), weights=fmt, activations="none", fuse=False).model
        graph = ir.import_model(model)
        (mm,) = [n for n in graph.nodes if n.op == "MatMul"]
        reason = ir.float_weight(mm, 1, "weight")
        assert isinstance(reason, str) and "already quantized" in reason, reason
        (entry,) = weight_storage(model).values()
        assert bits[0] <= entry["bits"] / entry["weights"] < bits[1], (fmt, entry)
        # quantizing the output again changes nothing: its weights are stored codes, not float weights
        again = quantize(model, weights=fmt, activations="none", fuse=False).model
        assert again.graph.SerializeToString() == model.graph.SerializeToString()


def test_float_weight_format_is_checked() -> None:
    with pytest.raises(Exception, match="float_weight_format"):
        quantize(_matmul(_weight()), weights="fp8_e4m3", activations="none", config={"float_weight_format": "fold"})


def test_cli_float_weight_format(tmp_path: Path) -> None:
    from onnxcomp.cli.main import main

    model = tmp_path / "mm.onnx"
    onnx.save(_matmul(_weight()), model)
    before = model.read_bytes()
    for form, op in (("dq", "DequantizeLinear"), ("cast", "Cast")):
        out = tmp_path / f"{form}.onnx"
        args = ["quantize", str(model), "-o", str(out), "--weights", "fp8_e4m3", "--activations", "none"]
        assert main([*args, "--float-weight-format", form, "--no-report"]) == 0
        assert op in {n.op_type for n in onnx.load(out).graph.node}
    assert model.read_bytes() == before  # the input file is never modified


def test_kernel_report_says_float_weights_are_decoded_at_load() -> None:
    from onnxcomp.analysis.kernels import kernel_report

    for form, reason in (("cast", "decoded once at session load"), ("dq", "dequantized at every run")):
        model = quantize(
            _matmul(_weight()), weights="fp8_e4m3", activations="none", fuse=False, float_weight_format=form
        )
        (row,) = kernel_report(model.model, [("mm", "MatMul", None)])["nodes"]
        assert not row["integer"] and reason in row["reason"], row
