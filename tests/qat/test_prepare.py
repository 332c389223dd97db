"""prepare / export: the places and scales of ``quantize``, byte-identical export, gradients, masks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, REPO

from onnxcomp import api
from onnxcomp.runtime import ort_session
from tests.real_models import make_inputs, real_model

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed: pip install 'onnxcomp[train]'")

from onnxcomp.errors import ConfigError  # noqa: E402
from onnxcomp.qat import prepare  # noqa: E402
from onnxcomp.qat.fakequant import FakeQuant  # noqa: E402
from onnxcomp.qat.training import fit  # noqa: E402

DEMO = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"


def _x(n: int = 32) -> np.ndarray:
    return np.load(MODELS / "digits_heldout.npz")["input"][:n]


@pytest.mark.parametrize(
    "flags",
    [
        {"weights": "int8", "activations": "uint8"},
        {"weights": "int4", "activations": "uint4"},
        {"weights": "int4", "activations": "uint8", "granularity": "tensor"},
        {"weights": "int8", "activations": "none", "weight_only_format": "dq"},
        {"weights": "fp8_e4m3", "activations": "uint8"},
    ],
)
def test_export_without_training_is_quantize_output(flags: dict[str, str]) -> None:
    module = prepare(DEMO, None, CALIB, **flags)
    ptq = api.quantize(DEMO, calibration=CALIB, reports=False, **flags).model
    assert module.export_model().SerializeToString() == ptq.SerializeToString()


def test_fake_quant_module_matches_exported_model() -> None:
    module = prepare(DEMO, None, CALIB, weights="int8", activations="uint8")
    x = _x(64)
    with torch.no_grad():
        y = module({"input": x})["logits"].numpy()
    r = ort_session(module.export_model(), level="disable").run(None, {"input": x})[0]
    # float accumulation order differs (torch vs onnxruntime): a rounding can flip by one step of the
    # last activation grid (relu_fc1_out, scale ~0.015), never more
    last = float(module.scale_of("relu_fc1_out"))
    assert np.abs(y - r).max() <= last * float(np.abs(module.graph.weight("fc2.weight").detach()).sum(1).max())
    assert np.mean(np.abs(y - r) > 1e-5) < 0.2
    assert (y.argmax(1) == r.argmax(1)).all()
    with torch.no_grad():
        yf = module.quantized(False)({"input": x})["logits"].numpy()
    rf = ort_session(onnx.load(DEMO)).run(None, {"input": x})[0]
    assert np.abs(yf - rf).max() < 1e-4


@pytest.mark.parametrize(("dtype", "zp"), [("uint8", 131), ("int8", -3), ("int4", 0), ("uint4", 9)])
def test_fake_quant_is_quantize_dequantize_linear_bit_exact(dtype: str, zp: int) -> None:
    """The codec's arithmetic: the same bits as onnxruntime's QuantizeLinear -> DequantizeLinear."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxcomp.formats import get_format
    from onnxcomp.quant.qweight import storage_array

    fmt = get_format(dtype)
    scale = np.float32(0.0371)
    x = (np.random.default_rng(1).standard_normal((4, 257)) * 3).astype(np.float32)
    x[0, :5] = np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32) * scale  # ties go to even
    inits = [
        numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
        numpy_helper.from_array(storage_array(np.asarray(zp), fmt), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    ref = ort_session(model, level="disable").run(None, {"x": x})[0]
    got = FakeQuant(dtype, np.asarray(scale), np.asarray(zp))(torch.from_numpy(x)).detach().numpy()
    assert got.tobytes() == ref.tobytes()


def test_gradients_reach_weights_and_scales() -> None:
    module = prepare(DEMO, None, CALIB, weights="int4", activations="uint4")
    out = module({"input": _x(16)})["logits"]
    out.pow(2).mean().backward()
    for name in module.graph.weight_keys:
        grad = module.graph.weight(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    scales = [*module.weight_quant.values(), *module.act_quant.values()]
    assert len(scales) == 14  # flatten_out shares relu4_out's quantizer (same grid)
    for fq in scales:
        assert fq.log_gain.grad is not None and float(fq.log_gain.grad.abs().sum()) > 0


def test_lsq_scale_gradient_matches_brute_force() -> None:
    """d/ds of sum((Q(x; s) - x)^2) from autograd (LSQ straight-through) vs the analytical LSQ formula."""
    x = torch.linspace(-2.01, 2.03, 97)  # no value exactly on a clipping boundary (where either rule holds)
    fq = FakeQuant("int4", np.asarray(0.2, np.float32), np.asarray(0), values_per_scale=1)
    fq.gradient_factor = 1.0
    y = fq(x)
    (y * 1.0).sum().backward()
    v = (x / 0.2).numpy()
    inside = np.clip(np.round(v), -8, 7)
    expected = np.where(v <= -8, -8.0, np.where(v >= 7, 7.0, inside - v)).sum()  # Esser et al. (2020), eq. 3
    assert fq.log_gain.grad is not None  # d/d(log gain) = s * d/ds
    assert abs(float(fq.log_gain.grad) - 0.2 * expected) < 1e-3


def test_masks_stay_exact_after_training(tmp_path: object) -> None:
    module = prepare(DEMO, None, CALIB, pattern="2:4", sparsity_method="magnitude", weights="int8", activations="uint8")
    zeros = {n: (module.graph.weight(n) == 0).clone() for n in module.masks}
    assert zeros and sum(int(z.sum()) for z in zeros.values()) > 0
    x = np.load(CALIB)["input"]
    fit(module, {"input": x[:64]}, epochs=1, lr=1e-2, batch_size=16, seed=0)
    exported = {t.name: onnx.numpy_helper.to_array(t) for t in module.export_model().graph.initializer}
    for name, z in zeros.items():
        assert (module._masked(name)[z.numpy()] == 0).all()
        codes = exported[f"{name}_quantized"].astype(np.int32)
        assert (codes[z.numpy()] == 0).all(), name  # int8 weights are symmetric: zero point 0


def test_unsupported_config_is_declined_with_reason() -> None:
    with pytest.raises(ConfigError, match="equalized PTQ: drop weight_algorithm='awq'"):
        prepare(DEMO, None, CALIB, weights="int4", activations="none", weight_algorithm="awq")
    # the storages it cannot export (uint4 tables, two-level scales, run-time activations): test_export_formats.py


def test_base_install_never_imports_torch_and_missing_torch_gives_the_hint() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # what an install without the train extra sees
        "import onnxcomp, onnxcomp.api, onnxcomp.cli.main, onnxcomp.qat\n"
        "from onnxcomp.cli.main import main\n"
        "sys.exit(main(['qat', 'models/digits_cnn.onnx', '-o', '/nonexistent/x.onnx', '--data', 'models/digits_calib.npz']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("quantization-aware training needs torch: pip install 'onnxcomp[train]'")
    )
    plain = "import sys, onnxcomp, onnxcomp.api, onnxcomp.cli.main; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", plain], cwd=REPO, timeout=120).returncode == 0


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "hif8"])
def test_float_grid_fake_quant_equals_the_codec(dtype: str) -> None:
    """Element float grids: the nearest value of the codec's table (random data: no exact ties)."""
    from onnxcomp.formats import get_format

    fmt = get_format(dtype)
    scale = np.float32(0.013)
    x = (np.random.default_rng(2).standard_normal(4096) * 0.5).astype(np.float32)
    ref = np.multiply(fmt.decode(fmt.encode(np.divide(x, scale))), scale, dtype=np.float32)
    got = FakeQuant(dtype, np.asarray(scale), np.asarray(0))(torch.from_numpy(x)).detach().numpy()
    assert np.array_equal(got, ref)


def test_simulation_export_without_training_is_quantize_simulation(tmp_path: Path) -> None:
    flags = {"weights": "int4", "activations": "uint8"}
    module = prepare(DEMO, None, CALIB, **flags)
    sim = tmp_path / "sim.onnx"
    api.quantize(DEMO, tmp_path / "q.onnx", calibration=CALIB, reports=False, simulation_output=sim, **flags)
    module.export(tmp_path / "a.onnx", tmp_path / "a_sim.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()
    assert (tmp_path / "a_sim.onnx").read_bytes() == sim.read_bytes()


def test_transformer_export_without_training_is_quantize_output() -> None:
    """MiniLM-L3 W8A8 (MatMul weights, int8 activations): the same bytes as quantize."""
    path = real_model("minilm_l3")
    calib = [make_inputs("minilm_l3", 8, 2)]
    flags = {"weights": "int8", "activations": "int8"}
    module = prepare(path, None, calib, **flags)
    assert len(module.weight_quant) == 18
    ptq = api.quantize(path, calibration=calib, reports=False, **flags).model
    assert module.export_model().SerializeToString() == ptq.SerializeToString()
