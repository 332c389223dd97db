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

# (config, flags, tolerance of |ORT - module| relative to the logits' magnitude)
CASES: dict[str, tuple[dict[str, Any] | None, dict[str, str], float]] = {
    "mxfp8 weights (Cast * Gather(scale))": (None, {"weights": "mxfp8", "activations": "none"}, 1e-5),
    "mxfp4 weights (Conv DQ, Gemm MatMulNBits)": (FLOAT_NBITS, {"weights": "mxfp4", "activations": "none"}, 1e-5),
    "int4 MatMulNBits": (FLOAT_NBITS, {"weights": "int4", "activations": "none"}, 1e-5),
    "fp4_e2m1 g32 weights, uint8 activations": (None, {"weights": "fp4_e2m1", "activations": "uint8"}, 0.05),
    "fp8 weights (DequantizeLinear) and activations": (
        None,
        {"weights": "fp8_e4m3", "activations": "fp8_e4m3", "float_weight_format": "dq"},
        1e-5,
    ),
    "hif8 weights and activations": (None, {"weights": "hif8", "activations": "hif8"}, 1e-5),
}


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
    sim = ort_session(module.simulation_model(), level="disable").run(None, {"input": x})[0]
    assert float(np.abs(sim - y).max()) / float(np.abs(r).max()) <= tolerance


def test_float_activations_are_bit_exact_and_biases_are_exported() -> None:
    """FP8 activations, float weights pinned: ORT equals the module to the bit; trained biases land in the file."""
    module = prepare(DEMO, None, CALIB, weights="fp8_e4m3", activations="fp8_e4m3")
    _perturb(module, seed=3)
    x = np.load(MODELS / "digits_heldout.npz")["input"][:32]
    with torch.no_grad():
        y = module({"input": x})["logits"].numpy()
    exported = module.export_model()
    r = ort_session(exported, level="disable").run(None, {"input": x})[0]
    assert np.abs(y - r).max() <= 1e-5 * np.abs(r).max()
    inits = {t.name: t for t in exported.graph.initializer}
    bias = module.graph.weight("conv1_bias").detach().numpy()
    from onnx import numpy_helper

    assert np.array_equal(numpy_helper.to_array(inits["conv1_bias"]), bias)


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


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ({"weights": "fp4_e2m1", "activations": "none", "fp4_storage": "uint4_lut"}, "drop fp4_storage='uint4_lut'"),
        (
            {"weights": "fp4_e2m1", "activations": "none", "scale_format": "fp8_e4m3", "weight_only_format": "dq"},
            "two-level scales .* drop scale_format",
        ),
        ({"weights": "int8", "activations": "mxfp8"}, "token activations are computed at run time"),
        ({"weights": "int8", "activations": "uint8", "smoothquant": 0.5}, "drop smoothquant=0.5"),
    ],
)
def test_storages_it_cannot_train_are_declined_in_one_line(flags: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        prepare(DEMO, None, CALIB, **flags)
    assert "\n" not in str(caught.value)
