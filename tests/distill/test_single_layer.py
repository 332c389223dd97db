"""One layer, every format: the distilled block error is <= round-to-nearest and every weight ends on the grid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp import ir
from onnxcomp.quant.distill.block import Tail, forward
from onnxcomp.quant.distill.grid import code_grid, grid_weight
from onnxcomp.quant.distill.rows import Layer, RowSource
from onnxcomp.quant.distill.train import Settings, block_error, learn_block
from onnxcomp.quant.spec import Granularity, TensorSpec
from onnxcomp.quant.weights import quantize_weight

MODELS = Path(__file__).resolve().parents[2] / "models"
FORMATS = [
    ("int4", "channel"),
    ("int8", "channel"),
    ("int4", "group:32"),
    ("uint8", "tensor"),  # asymmetric grid with a zero point
    ("fp4_e2m1", "group:32"),
    ("fp4_e1m2", "group:32"),
    ("mxfp4", "group:32"),
    ("fp8_e4m3", "channel"),
    ("mxfp8", "group:32"),
    ("hif8", "channel"),  # a table storage: learned in value units
]


def _spec(dtype: str, granularity: str) -> TensorSpec:
    kind, _, size = granularity.partition(":")
    return TensorSpec(dtype, Granularity(kind, int(size) if size else 0), dtype != "uint8", "minmax")


def _demo_conv() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real layer: conv2 of the digits CNN (BatchNorm folded by hand) and its real input (relu1's output)."""
    from onnxcomp.runtime import TensorRunner

    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.name == "conv2")
    bn = next(n for n in model.graph.node if n.name == "bn2")
    gamma, beta, mean, var = (inits[n] for n in bn.input[1:5])
    k = gamma / np.sqrt(var + 1e-5)
    w = (inits[conv.input[1]] * k[:, None, None, None]).astype(np.float32)
    b = inits[conv.input[2]] if len(conv.input) > 2 else np.zeros(w.shape[0], np.float32)
    bias = ((b - mean) * k + beta).astype(np.float32)
    x = np.load(MODELS / "digits_calib.npz")["input"][:8]
    relu = TensorRunner(model, [conv.input[0]], truncate=True).run({"input": x}, 0)
    return w, bias, relu[conv.input[0]]


def _case(real: bool, seed: int) -> tuple[Layer, np.ndarray, np.ndarray, np.ndarray, list[Tail]]:
    if real:
        w, bias, x = _demo_conv()
        layer = Layer("Conv", w.shape, kernel=(3, 3), strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1))
        return layer, w, bias, x, [Tail("Relu")]
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((24, 64)) * rng.uniform(0.2, 2.0, (24, 1))).astype(np.float32)
    x = (rng.standard_normal((512, 64)) * rng.uniform(0.1, 3.0, 64)).astype(np.float32)  # uneven channels
    return (
        Layer("Gemm", w.shape, transposed_weight=True),
        w,
        rng.normal(0, 0.1, 24).astype(np.float32),
        x,
        [Tail("Relu")],
    )


CASES = [(*f, False) for f in FORMATS] + [
    ("int4", "channel", True),
    ("int8", "channel", True),
    ("fp4_e2m1", "group:32", True),
    ("mxfp4", "group:32", True),
]


@pytest.mark.parametrize("dtype,granularity,real", CASES, ids=lambda v: str(v))
def test_distilled_error_at_most_rtn_and_hard(dtype: str, granularity: str, real: bool) -> None:
    layer, w, bias, x, tails = _case(real, 0)
    source = RowSource(layer, x)
    every = np.arange(source.count)
    target_rows, _ = forward(source.rows(every).astype(np.float64), layer.to_matrix(w.astype(np.float64)), bias, tails)
    target = source.assemble(target_rows.astype(np.float32), x.shape[0])
    spec = _spec(dtype, granularity)
    qw = quantize_weight(w, spec, ir.weight_layout(layer.op, w.ndim, layer.transposed_weight))
    gw = grid_weight(w, qw)
    assert not isinstance(gw, str), gw
    learned = learn_block(
        source,
        target,
        layer,
        gw,
        bias.astype(np.float64),
        tails,
        Settings(iters=150, batch_rows=512),
        np.random.default_rng(0),
    )
    # the error before is round-to-nearest's, measured on every row
    rtn = block_error(source, target, layer, qw.dequantized, bias, tails, every)
    assert learned.error_before == pytest.approx(rtn, rel=1e-5)
    assert learned.error_after <= learned.error_before
    deployed = gw.to_quantized(learned.codes, learned.log_scale, {"name": "distill"})
    after = block_error(source, target, layer, deployed.dequantized, learned.bias, tails, every)
    assert after == pytest.approx(learned.error_after, rel=1e-5)
    # hard: every code is one of its two grid neighbours, and a code of the format
    assert np.isin(learned.codes, code_grid(qw)).all()
    assert ((learned.codes == gw.low) | (learned.codes == gw.high)).all()
    assert deployed.codes.dtype == qw.codes.dtype and deployed.scale.dtype == np.float32
    if learned.kept == "distilled" and dtype in ("int4", "fp4_e2m1", "mxfp4"):
        assert learned.error_after < 0.9 * learned.error_before  # the low-bit grids gain clearly


def test_pruned_zeros_stay_exact() -> None:
    """2:4 masks are kept: a weight that is exactly zero has no rounding choice and stays zero."""
    layer, w, bias, x, tails = _case(False, 1)
    w = w.copy()
    w.reshape(-1, 4)[:, :2] = 0.0  # a 2:4 pattern
    spec = _spec("int4", "channel")
    qw = quantize_weight(w, spec, ir.weight_layout("Gemm", 2, True))
    gw = grid_weight(w, qw)
    assert not isinstance(gw, str)
    source = RowSource(layer, x)
    y, _ = forward(source.rows(np.arange(source.count)), layer.to_matrix(w), bias, tails)
    learned = learn_block(
        source, y, layer, gw, bias.astype(np.float64), tails, Settings(iters=60), np.random.default_rng(0)
    )
    deployed = gw.to_quantized(learned.codes, learned.log_scale, {})
    assert (deployed.dequantized[w == 0] == 0).all()


def test_cli_distill_writes_model_and_record(tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.load(MODELS / "digits_calib.npz")["input"][:16])
    out = tmp_path / "d.onnx"
    cmd = [sys.executable, "-m", "onnxcomp", "distill", str(MODELS / "digits_cnn.onnx"), "-o", str(out)]
    cmd += ["--calib", str(calib), "--weights", "int4", "--activations", "none", "--iters", "20", "--no-report"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.exists() and (tmp_path / "d.quant_record.json").exists()
    assert "distilled" in done.stdout


@pytest.mark.parametrize(
    "dtype,scale_format,fp4_storage",
    [
        ("fp4_e2m1", None, "uint4_lut"),
        ("mxfp4", None, "uint4_lut"),
        ("fp4_e2m1", "fp8_e4m3", "int8"),
        ("fp4_e1m2", "fp8_e4m3", "int8"),
    ],
)
@pytest.mark.parametrize("real", [False, True])
def test_table_and_two_level_storages_are_distilled(
    dtype: str, scale_format: str | None, fp4_storage: str, real: bool
) -> None:
    """FP4 as uint4 codes + int8 table, and two-level FP4 (FP8 group scales x float32 channel scales):
    learned in the storage's own integers, error <= RTN, codes of the storage, and (two-level) the
    stored scales untouched."""
    layer, w, bias, x, tails = _case(real, 2)
    source = RowSource(layer, x)
    every = np.arange(source.count)
    target_rows, _ = forward(source.rows(every).astype(np.float64), layer.to_matrix(w.astype(np.float64)), bias, tails)
    target = source.assemble(target_rows.astype(np.float32), x.shape[0])
    spec = TensorSpec(dtype, Granularity("group", 16 if real else 32), True, "minmax", scale_format=scale_format)
    qw = quantize_weight(w, spec, ir.weight_layout(layer.op, w.ndim, layer.transposed_weight), "w", fp4_storage)
    assert qw.storage == ("dq2" if scale_format else "lut_dq")
    gw = grid_weight(w, qw)
    assert not isinstance(gw, str), gw
    assert gw.learn_scale is False if scale_format or dtype.startswith("mx") else gw.learn_scale
    learned = learn_block(
        source,
        target,
        layer,
        gw,
        bias.astype(np.float64),
        tails,
        Settings(iters=150, batch_rows=512),
        np.random.default_rng(0),
    )
    assert learned.kept == "distilled"
    assert learned.error_after < 0.9 * learned.error_before
    deployed = gw.to_quantized(learned.codes, learned.log_scale, {"name": "distill"})
    assert deployed.codes.dtype == qw.codes.dtype and deployed.storage == qw.storage
    after = block_error(source, target, layer, deployed.dequantized, learned.bias, tails, every)
    assert after == pytest.approx(learned.error_after, rel=1e-5)
    # the stored codes read back (through the storage's own decoding) as the deployed weight
    again = grid_weight(deployed.dequantized, deployed)
    assert not isinstance(again, str), again
    np.testing.assert_array_equal(again.rtn, learned.codes)
    if scale_format:
        np.testing.assert_array_equal(deployed.scale, qw.scale)
        np.testing.assert_array_equal(
            np.asarray(deployed.group_scale_codes).view(np.uint8), np.asarray(qw.group_scale_codes).view(np.uint8)
        )
