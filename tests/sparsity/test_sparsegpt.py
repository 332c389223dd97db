"""SparseGPT for n:m sparsity (``onnxcomp.sparsity.sparsegpt``) and the ``sparsify_2to4`` method option."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp.api import compress, sparsify
from onnxcomp.errors import OnnxCompError, PassError
from onnxcomp.formats.nm import NMPattern, apply_nm, is_nm_sparse
from onnxcomp.framework.registry import make_pass
from onnxcomp.sparsity.sparsegpt import output_error, sparsegpt_nm
from onnxcomp.testing import run_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_models import Net  # noqa: E402


def _inputs(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((5, d)) * np.array([[4.0], [2.0], [1.0], [0.5], [0.25]])
    return rng.standard_normal((n, 5)) @ basis + 0.2 * rng.standard_normal((n, d))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_masks_are_exactly_nm_and_error_beats_magnitude(n: int, m: int) -> None:
    pattern = NMPattern(n, m)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64)).astype(np.float32)  # (Cout, K): a Gemm transB weight
    x = _inputs(500, 64, seed=1)
    h = x.T @ x / len(x)
    sparse = sparsegpt_nm(w, pattern, h, channel_axis=0, reduction_axis=1)
    assert sparse.dtype == w.dtype and sparse.shape == w.shape
    assert is_nm_sparse(sparse, 1, pattern)
    magnitude = apply_nm(w, 1, pattern)
    axes = {"channel_axis": 0, "reduction_axis": 1}
    e_sgpt, e_mag = output_error(w, sparse, h, **axes), output_error(w, magnitude, h, **axes)
    direct = np.sum((x @ (w - sparse).T.astype(np.float64)) ** 2) / np.sum((x @ w.T.astype(np.float64)) ** 2)
    assert e_sgpt == pytest.approx(direct, rel=1e-6)
    assert e_sgpt < 0.5 * e_mag, (e_sgpt, e_mag)


def test_conv_groups_run_along_input_channels_at_every_kernel_position() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 10, 3, 3)).astype(np.float32)  # Cin 10: groups of 4, 4 and 2 per position
    x = _inputs(800, 90, seed=3)
    h = x.T @ x / len(x)
    sparse = sparsegpt_nm(w, NMPattern(), h, channel_axis=0, reduction_axis=1, block=8)
    assert is_nm_sparse(sparse, 1, NMPattern())
    e = [output_error(w, s, h, channel_axis=0, reduction_axis=1) for s in (sparse, apply_nm(w, 1, NMPattern()))]
    assert e[0] < e[1]
    grouped = sparsegpt_nm(w, NMPattern(), np.stack([h, h]), channel_axis=0, reduction_axis=1)
    np.testing.assert_array_equal(grouped, sparsegpt_nm(w, NMPattern(), h, channel_axis=0, reduction_axis=1))


def _conv_model() -> onnx.ModelProto:
    net = Net(seed=4, shape=("N", 8, 10, 10))
    y = net.conv("x", 8, 16, "c1")
    y = net.op("Relu", [y])
    y = net.conv(y, 16, 16, "c2")
    y = net.op("Relu", [y])
    y = net.conv(y, 16, 8, "c3", k=1)
    return net.build([y])


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    mix = np.random.default_rng(0).standard_normal((2, 8))  # one input distribution for every seed
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 2, 10, 10))
    x = np.einsum("nchw,cd->ndhw", base, mix) + 0.1 * rng.standard_normal((n, 8, 10, 10))
    return {"x": x.astype(np.float32)}


def test_pass_sparsegpt_beats_magnitude_through_onnxruntime() -> None:
    model = _conv_model()
    calib, test = _data(32, 5), _data(16, 6)
    (ref,) = run_model(model, test)
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        report = compress(model, [make_pass("sparsify_2to4", {"method": method})], calibration=calib, batch_size=8)
        result = report.result("sparsify_2to4")
        assert result.data["method"] == dict.fromkeys(("c1", "c2", "c3"), method)
        assert all(e["method"] == method for e in result.data["layers"])
        for init in report.model.graph.initializer:
            if init.name.endswith(".w"):
                assert is_nm_sparse(onnx.numpy_helper.to_array(init), 1)
        (out,) = run_model(report.model, test)
        errors[method] = float(np.sum((out - ref) ** 2) / np.sum(ref**2))
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors
    # the default is sparsegpt with calibration data, magnitude without
    auto = compress(model, [make_pass("sparsify_2to4", {})], calibration=calib, batch_size=8)
    assert set(auto.result("sparsify_2to4").data["method"].values()) == {"sparsegpt"}
    plain = compress(model, [make_pass("sparsify_2to4", {})])
    assert set(plain.result("sparsify_2to4").data["method"].values()) == {"magnitude"}


def test_sparsegpt_without_data_is_a_one_line_error_and_quantize_keeps_zeros() -> None:
    model = _conv_model()
    with pytest.raises(PassError, match="needs calibration data: pass --calib"):
        sparsify(model, pattern="2:4", method="sparsegpt")
    with pytest.raises(OnnxCompError, match="--method"):
        sparsify(model, ratio=0.3, method="magnitude")
    report = sparsify(model, pattern="2:4", calibration=_data(16, 7), quantize="int8", batch_size=8)
    assert report.result("sparsify_2to4").data["method"]["c2"] == "sparsegpt"
    (out,) = run_model(report.model, _data(4, 8))
    assert np.isfinite(out).all()


def test_ppocr_cls_sparsegpt_per_layer_and_classifier_agreement() -> None:
    from tests.real_models import make_inputs, real_model

    model = onnx.load(str(real_model("ppocr_cls")))
    calib, test = make_inputs("ppocr_cls", 32, seed=1), make_inputs("ppocr_cls", 200, seed=99)
    (ref,) = run_model(model, test)
    agree = {}
    for method in ("magnitude", "sparsegpt"):
        report = sparsify(model, pattern="2:4", method=method, calibration=calib, batch_size=16)
        result = report.result("sparsify_2to4")
        if method == "sparsegpt":
            for entry in result.data["layers"]:  # on the calibration data every layer is better
                assert entry["output_error"] < entry["output_error_magnitude"], entry
        (out,) = run_model(report.model, test)
        agree[method] = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
    assert agree["sparsegpt"] >= agree["magnitude"], agree
    # the classifier head alone (2:4 on its MatMul): SparseGPT keeps the predictions
    head = compress(model, [make_pass("sparsify_2to4", {"ops": ["MatMul"]})], calibration=calib, batch_size=16)
    (out,) = run_model(head.model, test)
    assert float(np.mean(out.argmax(-1) == ref.argmax(-1))) >= 0.95
