"""Export of every weight storage and float activation format ``quantize`` writes (issue 17, item 2).

For each format: the export of an untrained module has ``quantize``'s bytes, and after a seeded
perturbation of every weight, bias and learnable scale (a stand-in for training), onnxruntime's
output of the export equals the module's fake-quant output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import MODELS

from onnxcomp import api
from onnxcomp.runtime import ort_session

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed: pip install 'onnxcomp[train]'")

from onnxcomp.errors import ConfigError  # noqa: E402
from onnxcomp.formats import get_format  # noqa: E402
from onnxcomp.qat import prepare  # noqa: E402
from onnxcomp.qat.fakequant import FakeQuant  # noqa: E402

DEMO = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
#: MatMulNBits at accuracy level 0 computes in float (level 4 quantizes the input to int8 at run time)
FLOAT_NBITS = {"matmulnbits_accuracy_level": 0}

FP4_WEIGHT_ONLY = {"weights": "fp4_e2m1", "activations": "none", "weight_only_format": "dq"}

# (config, flags, tolerance of |ORT - module| relative to the logits' magnitude). Weight-only: float
# accumulation order only. Quantized activations: torch's and onnxruntime's convolutions sum in
# different orders, so an activation a few ulps from a rounding boundary can round to the
# neighbouring grid value (the rounding itself is bit-exact: test_float_activation_subgraphs_...)
CASES: dict[str, tuple[dict[str, Any] | None, dict[str, str], float]] = {
    "mxfp8 weights (Cast * Gather(scale))": (None, {"weights": "mxfp8", "activations": "none"}, 1e-5),
    "mxfp4 weights (Conv DQ, Gemm MatMulNBits)": (FLOAT_NBITS, {"weights": "mxfp4", "activations": "none"}, 1e-5),
    "int4 MatMulNBits": (FLOAT_NBITS, {"weights": "int4", "activations": "none"}, 1e-5),
    "fp4_e2m1 g32 weights, uint8 activations": (None, {"weights": "fp4_e2m1", "activations": "uint8"}, 0.05),
    "fp8 weights (DequantizeLinear) and activations": (
        None,
        {"weights": "fp8_e4m3", "activations": "fp8_e4m3", "float_weight_format": "dq"},
        0.02,
    ),
    "hif8 weights and activations": (None, {"weights": "hif8", "activations": "hif8"}, 0.02),
    "fp4 as uint4 codes + table": (None, {**FP4_WEIGHT_ONLY, "fp4_storage": "uint4_lut"}, 1e-5),
    "fp4 two-level scales (fixed)": (None, {**FP4_WEIGHT_ONLY, "scale_format": "fp8_e4m3"}, 1e-5),
    # activations quantized at run time, one scale per token (nothing learned: the export is the PTQ model's form)
    "int8 per-token activations": (None, {"weights": "int8", "activations": "int8", "dynamic": True}, 0.05),
    "fp8 per-token activations": (None, {"weights": "fp8_e4m3", "activations": "fp8_e4m3", "dynamic": True}, 0.05),
    "hif8 per-token activations": (None, {"weights": "int8", "activations": "hif8", "dynamic": True}, 0.05),
    "mxfp8 activations (32-blocks)": (None, {"weights": "int8", "activations": "mxfp8"}, 0.05),
    # DynamicQuantizeLinear + ConvInteger / MatMulInteger (the fused form; placement all: the Convs too):
    # the trained codes, weight scales and float biases land in it
    "per-tensor dynamic uint8 activations": (
        None,
        {
            "weights": "int8",
            "activations": "uint8",
            "dynamic": True,
            "dynamic_granularity": "tensor",
            "placement": "all",
        },
        0.05,
    ),
    # starting points: the module starts from GPTQ's codes, the corrected (int32) biases, equalized weights
    "W8A8 from GPTQ + bias correction": (
        None,
        {"weights": "int8", "activations": "uint8", "weight_algorithm": "gptq", "bias_correction": "fast"},
        0.05,
    ),
    "W8A8 per tensor from equalization": (
        None,
        {"weights": "int8", "activations": "uint8", "granularity": "tensor", "equalize": True},
        0.05,
    ),
}

SIMULATED = ("fp4_e2m1 g32 weights, uint8 activations", "hif8 weights and activations")


def _perturb(module: Any, seed: int = 0) -> None:
    """Move every parameter and learnable scale as a few training steps would (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.graph.weights.values():
            p.add_(torch.randn(p.shape, generator=gen) * p.abs().mean() * 0.05)
        for fq in [*module.weight_quant.values(), *module.act_quant.values()]:
            if fq.log_gain.requires_grad:
                fq.log_gain.add_(torch.randn(fq.log_gain.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("case", list(CASES))
def test_export_of_each_format(case: str) -> None:
    config, flags, tolerance = CASES[case]
    module = prepare(DEMO, config, CALIB, **flags)
    ptq = api.quantize(DEMO, config=config, calibration=CALIB, reports=False, **flags).model
    assert module.export_model().SerializeToString() == ptq.SerializeToString()
    _perturb(module)
    x = np.load(MODELS / "digits_heldout.npz")["input"][:64]
    with torch.no_grad():
        y = module({"input": x})["logits"].numpy()
    exported = module.export_model()
    assert exported.SerializeToString() != ptq.SerializeToString()
    r = ort_session(exported, level="disable").run(None, {"input": x})[0]
    err = float(np.abs(y - r).max()) / float(np.abs(r).max())
    assert err <= tolerance, err
    assert (y.argmax(1) == r.argmax(1)).mean() >= 0.98
    if case in SIMULATED:  # the simulation model (one more pipeline run): two cases keep the suite fast
        sim = ort_session(module.simulation_model(), level="disable").run(None, {"input": x})[0]
        assert float(np.abs(sim - y).max()) / float(np.abs(r).max()) <= tolerance


def test_trained_biases_and_activation_scales_are_exported() -> None:
    """FP8 weights (Cast form) and activations: the trained float biases and learned scales land in the file."""
    from onnx import numpy_helper

    module = prepare(DEMO, None, CALIB, weights="fp8_e4m3", activations="fp8_e4m3")
    _perturb(module, seed=3)
    x = np.load(MODELS / "digits_heldout.npz")["input"][:32]
    with torch.no_grad():
        y = module({"input": x})["logits"].numpy()
    exported = module.export_model()
    r = ort_session(exported, level="disable").run(None, {"input": x})[0]
    assert np.abs(y - r).max() <= 0.02 * np.abs(r).max() and (y.argmax(1) == r.argmax(1)).all()
    inits = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    assert np.array_equal(inits["conv1_bias"], module.graph.weight("conv1_bias").detach().numpy())
    bound = inits["input_fp8_e4m3_scale_k"]  # s 2^-k of the input's E4M3 subgraph
    assert bound == np.float32(np.ldexp(module.scale_of("input").reshape(()), -2))


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2", "hif8"])
def test_float_activation_subgraphs_round_as_the_module(dtype: str) -> None:
    """The exported FP8 / HiF8 activation subgraph on onnxruntime == FakeQuant, bit for bit (ties, saturation)."""
    from onnx import TensorProto, helper

    from onnxcomp import ir
    from onnxcomp.quant.activation_subgraphs import emit_cast_activation, emit_hif8_activation

    scale = np.float32(0.0123)
    fmt = get_format(dtype)
    values = np.unique(np.abs(fmt.values[np.isfinite(fmt.values)])).astype(np.float64)
    mids = (values[1:] + values[:-1]) / 2 * float(scale)
    rng = np.random.default_rng(5)
    x = np.concatenate([mids, -mids, rng.standard_normal(4000) * float(scale) * values.max() / 4, [1e9, -1e9, 0.0]])
    x = x.astype(np.float32).reshape(1, -1)
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    graph = ir.import_model(proto)
    node = graph.nodes[0]
    if dtype == "hif8":
        out = emit_hif8_activation(graph, node.inputs[0], float(scale), "x_hif8")
    else:
        out = emit_cast_activation(graph, node.inputs[0], float(scale), dtype, f"x_{dtype}")
    node.inputs[0] = out
    ref = ort_session(ir.export_model(graph, proto), level="disable").run(None, {"x": x})[0]
    got = FakeQuant(dtype, np.asarray(scale), np.asarray(0))(torch.from_numpy(x)).detach().numpy()
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp4_e2m1", "hif8"])
def test_float_grid_ties_follow_the_codec(dtype: str) -> None:
    """Exact midpoints between grid values: to the even code (FP8, FP4) or away from zero (HiF8), as the codec."""
    fmt = get_format(dtype)
    values = np.unique(np.abs(fmt.values[np.isfinite(fmt.values)]))
    mids = ((values[1:] + values[:-1]) / 2).astype(np.float32)
    x = np.concatenate([mids, -mids, values.astype(np.float32) * 1.5]).astype(np.float32)
    ref = fmt.decode(fmt.encode(x)).astype(np.float32)
    got = FakeQuant(dtype, np.asarray(1.0, np.float32), np.asarray(0))(torch.from_numpy(x)).detach().numpy()
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
def test_per_token_fake_quant_is_the_emitted_subgraph(dtype: str) -> None:
    """MatMul by the identity after the emitted per-token quantization == TokenFakeQuant, bit for bit."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxcomp import ir
    from onnxcomp.qat.fakequant import TokenFakeQuant
    from onnxcomp.quant.emit import emit_dynamic_per_token

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 48)) * rng.uniform(0.01, 10, (64, 1))).astype(np.float32)
    x[0] = 0.0  # an all-zero token: the scale floor
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "eye"], ["y"], name="mm")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
            [numpy_helper.from_array(np.eye(48, dtype=np.float32), "eye")],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    graph = ir.import_model(proto)
    emit_dynamic_per_token(graph, graph.nodes[0], 0, dtype, -1)
    ref = ort_session(ir.export_model(graph, proto), level="disable").run(None, {"x": x})[0]
    got = TokenFakeQuant(dtype, -1)(torch.from_numpy(x)).detach().numpy()
    assert np.array_equal(got, ref)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [({"weights": "int8", "activations": "uint8", "smoothquant": 0.5}, "drop smoothquant=0.5")],
)
def test_storages_it_cannot_train_are_declined_in_one_line(flags: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        prepare(DEMO, None, CALIB, **flags)
    assert "\n" not in str(caught.value)
