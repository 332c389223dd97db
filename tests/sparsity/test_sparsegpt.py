"""SparseGPT for n:m sparsity (``onnxcomp.sparsity.sparsegpt``) and the ``sparsify_2to4`` method option."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp import ir
from onnxcomp.api import compress, sparsify
from onnxcomp.errors import OnnxCompError, PassError
from onnxcomp.formats.nm import NMPattern, apply_nm, is_nm_sparse
from onnxcomp.framework.registry import make_pass
from onnxcomp.sparsity.dense_target import DenseTargetStats, fit_dense_target, masked_refit
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
    saliency = sparsegpt_nm(w, pattern, h, mask_rule="saliency", **axes)  # SparseGPT's own per-weight rule
    assert is_nm_sparse(saliency, 1, pattern)
    assert e_sgpt <= output_error(w, saliency, h, **axes), (e_sgpt, output_error(w, saliency, h, **axes))


def _sweep_by_least_squares(w: np.ndarray, h: np.ndarray, pruned: tuple[int, ...]) -> float:
    """The OBS sweep without Cholesky: column by column, zero it if pruned, then re-solve the columns
    after it by least squares given the ones before (``min (w - v)^T H (w - v)`` with a fixed prefix)."""
    d = len(w)
    cur = w.astype(np.float64).copy()
    for k in range(d):
        if k in pruned:
            cur[k] = 0.0
        if k + 1 < d:
            tail, head = slice(k + 1, d), slice(0, k + 1)
            cur[tail] = w[tail] + np.linalg.solve(h[tail, tail], h[tail, head] @ (w[head] - cur[head]))
    diff = w - cur
    return float(diff @ h @ diff)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_mask_rule_picks_the_cheapest_sweep_of_every_candidate(seed: int) -> None:
    """One group of 4 columns: the "obs" rule's error is the least over all 6 masks of the sweep's
    error, computed independently by least squares; SparseGPT's saliency rule is never below it."""
    rng = np.random.default_rng(seed)
    x = _inputs(400, 4, seed=seed + 20)
    h = x.T @ x / len(x)
    w = rng.standard_normal((12, 4))
    axes = {"channel_axis": 0, "reduction_axis": 1}
    obs = sparsegpt_nm(w, NMPattern(), h, damp=0.0, **axes)
    saliency = sparsegpt_nm(w, NMPattern(), h, damp=0.0, mask_rule="saliency", **axes)
    worse = 0
    for r in range(len(w)):
        best = min(_sweep_by_least_squares(w[r], h, pruned) for pruned in itertools.combinations(range(4), 2))
        got = float((w[r] - obs[r]) @ h @ (w[r] - obs[r]))
        assert got == pytest.approx(best, rel=1e-8, abs=1e-12), r
        other = float((w[r] - saliency[r]) @ h @ (w[r] - saliency[r]))
        assert other >= got * (1 - 1e-9)
        worse += other > got * (1 + 1e-6)
    assert worse > 0  # the rules differ on real rows, not only in principle


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


def test_ppocr_cls_2to4_keeps_fp32_top1_accuracy() -> None:
    """2:4 on every layer by SparseGPT (the CLI default: sequential, dense target, "obs" masks) against the labels.

    Measured here (64 calibration images, 500 held-out): fp32 0.926; the default 0.896 (0.968 of
    fp32, agreement 0.910); with SparseGPT's saliency mask rule 0.862 (0.931); the plain sequential
    SparseGPT (target "layer") 0.514; magnitude 0.486. On 1500 held-out images over calibration
    seeds 1-5 the default keeps 0.954-0.973 of fp32 top-1 (saliency rule: 0.935-0.957;
    bench/README.md "2:4 SparseGPT across calibration seeds"), so the issue's >= 0.95 is asserted."""
    from tests.real_models import make_inputs, real_model

    model = onnx.load(str(real_model("ppocr_cls")))
    calib = make_inputs("ppocr_cls", 64, seed=1)
    test, meta = make_inputs("ppocr_cls", 500, seed=99, return_meta=True)
    (ref,) = run_model(model, test)
    accuracy_fp32 = float(np.mean(ref.argmax(-1) == meta["labels"]))
    assert accuracy_fp32 > 0.9

    def measure(sparse: onnx.ModelProto) -> tuple[float, float]:
        (out,) = run_model(sparse, test)
        return float(np.mean(out.argmax(-1) == meta["labels"])), float(np.mean(out.argmax(-1) == ref.argmax(-1)))

    report = sparsify(model, pattern="2:4", calibration=calib, batch_size=16)
    result = report.result("sparsify_2to4")
    assert set(result.data["method"].values()) == {"sparsegpt"} and len(result.data["method"]) == 41
    assert "not one whole group of 2:4" in dict(result.declined)["Conv@0"]  # the first conv: 3 image channels
    assert "a depthwise conv" in dict(result.declined)["Conv@2"]  # 2:4 has nothing to choose in a 3x3 kernel
    for init in report.model.graph.initializer:
        w = onnx.numpy_helper.to_array(init)
        if w.ndim == 4 and w.shape[1] >= 4:
            assert is_nm_sparse(w, 1), init.name
    for entry in result.data["layers"]:  # fitted to the dense model: never worse than magnitude on the data
        assert entry["target"] == "dense" and entry["output_error"] <= entry["output_error_magnitude"], entry
    accuracy, agreement = measure(report.model)
    assert accuracy >= 0.95 * accuracy_fp32, (accuracy, accuracy_fp32, agreement)
    assert agreement >= 0.9
    accuracy_magnitude, _ = measure(sparsify(model, pattern="2:4", method="magnitude").model)
    assert accuracy_magnitude < 0.6 * accuracy_fp32


# --- dense target (sparsify_2to4 target="dense") ---------------------------------------------


def _gemm(cout: int, d: int) -> ir.Node:
    x = ir.Variable("x", np.float32, ["N", d])
    return ir.Node("Gemm", "g", attrs={"transB": 1}, inputs=[x, ir.make_constant("w", np.zeros((cout, d), np.float32))])


def _layer_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``X_s`` (the sparse model's input), the dense weight and bias, and ``Y_d`` on a different ``X_d``."""
    rng = np.random.default_rng(seed)
    x_s = _inputs(300, 8, seed) + 1.5  # a mean the bias must absorb
    x_d = x_s + 0.3 * rng.standard_normal(x_s.shape)  # upstream layers changed the input
    w, b = rng.standard_normal((3, 8)), rng.standard_normal(3)
    return x_s, w, b, x_d @ w.T + b


def _stats(x: np.ndarray, y: np.ndarray, halves: bool = False) -> DenseTargetStats:
    stats = DenseTargetStats(_gemm(y.shape[1], x.shape[1]), None, np.random.default_rng(0))
    if not halves:
        stats.update(x, y)
        return stats
    other = DenseTargetStats(stats.node, None, np.random.default_rng(0))
    stats.update(x[:120], y[:120])
    other.update(x[120:], y[120:])
    stats.merge(other)
    return stats


def _lstsq_row(x: np.ndarray, y: np.ndarray, cols: np.ndarray, bias: bool) -> tuple[np.ndarray, float, float]:
    a = np.hstack([x[:, cols], np.ones((len(x), 1))]) if bias else x[:, cols]
    theta = np.linalg.lstsq(a, y, rcond=None)[0]
    return theta[: len(cols)], float(theta[-1]) if bias else 0.0, float(np.sum((a @ theta - y) ** 2))


def test_dense_target_matches_brute_force_least_squares() -> None:
    x, w, b, y = _layer_data(10)
    one, merged = _stats(x, y), _stats(x, y, halves=True)
    assert one.h is not None and merged.h is not None and one.c is not None and merged.c is not None
    np.testing.assert_allclose(merged.h, one.h, rtol=1e-12)
    np.testing.assert_allclose(merged.c, one.c, rtol=1e-12)
    assert merged.rows == one.rows == 300 and merged.yy == pytest.approx(one.yy, rel=1e-12)
    pattern = NMPattern(2, 4)
    fit = fit_dense_target(
        w, b, merged, pattern, channel_axis=0, reduction_axis=1, fit_bias=True, ridge=0.0, refit_kept=True
    )
    assert fit.method == "sparsegpt" and is_nm_sparse(fit.weight, 1, pattern)
    assert fit.bias is not None
    masks = [np.array(c) for c in itertools.combinations(range(4), 2)]
    total = best = 0.0
    for r in range(3):
        kept = np.flatnonzero(fit.weight[r])
        assert len(kept) == 4  # exactly 2 of every 4
        coef, bias, err = _lstsq_row(x, y[:, r], kept, bias=True)  # the refit is THE least squares on the mask
        np.testing.assert_allclose(fit.weight[r, kept], coef, rtol=1e-6, atol=1e-8)
        assert fit.bias[r] == pytest.approx(bias, rel=1e-6, abs=1e-8)
        total += err
        best += min(_lstsq_row(x, y[:, r], np.concatenate([a, 4 + c]), True)[2] for a in masks for c in masks)
    assert fit.errors["fit"] == pytest.approx(total / np.sum(y**2), rel=1e-6)
    assert best <= total <= 1.3 * best, (total, best)  # the OBS mask is close to the best of all 36 per row
    assert fit.errors["fit"] < 0.5 * fit.errors["magnitude"], fit.errors
    # without a bias to refit (MatMul) the dense bias is taken out of the target and kept
    fixed = fit_dense_target(
        w, b, merged, pattern, channel_axis=0, reduction_axis=1, fit_bias=False, ridge=0.0, refit_kept=True
    )
    assert fixed.bias is None
    for r in range(3):
        kept = np.flatnonzero(fixed.weight[r])
        coef = _lstsq_row(x, y[:, r] - b[r], kept, bias=False)[0]
        np.testing.assert_allclose(fixed.weight[r, kept], coef, rtol=1e-6, atol=1e-8)


def test_masked_refit_solves_each_row_on_its_mask() -> None:
    x, w, _, y = _layer_data(11)
    keep = np.zeros_like(w, dtype=bool)
    keep[:, [0, 3, 5, 6]] = True
    keep[1, [0, 1]] = [False, True]
    out = masked_refit(w, keep, x.T @ x, x.T @ y, lam=0.0)
    assert np.all(out[~keep] == 0)
    for r in range(3):
        cols = np.flatnonzero(keep[r])
        np.testing.assert_allclose(out[r, cols], _lstsq_row(x, y[:, r], cols, bias=False)[0], rtol=1e-8)


def _mixed_model() -> onnx.ModelProto:
    net = Net(seed=12, shape=("N", 8, 10, 10))
    y = net.op("Relu", [net.conv("x", 8, 16, "c1", bias=False)])  # gets a bias
    y = net.op("Relu", [net.conv(y, 16, 16, "grouped", group=2)])  # 8 input channels per group
    y = net.op("Flatten", [net.op("GlobalAveragePool", [y])])
    y = net.op("Relu", [net.gemm(y, 16, 12, "fc_kn", trans_b=0)])
    net.nodes[-2].attribute.append(onnx.helper.make_attribute("alpha", 0.5))
    return net.build([net.matmul(y, 12, 4, "head")])


def test_pass_dense_target_exact_masks_on_every_layer_kind() -> None:
    model = _mixed_model()
    calib, test = _data(64, 13), _data(32, 14)
    (ref,) = run_model(model, test)
    errors = {}
    for name, options in {
        "magnitude": {"method": "magnitude"},
        "layer": {"method": "sparsegpt", "target": "layer"},
        "dense": {"method": "sparsegpt"},
    }.items():
        report = compress(model, [make_pass("sparsify_2to4", options)], calibration=calib, batch_size=16)
        result = report.result("sparsify_2to4")
        assert len(result.data["layers"]) == 4
        weights = {i.name: onnx.numpy_helper.to_array(i) for i in report.model.graph.initializer}
        for tensor, axis in {"c1.w": 1, "grouped.w": 1, "fc_kn.w": 0, "head.w": 0}.items():
            assert is_nm_sparse(weights[tensor], axis), (name, tensor)
        if name == "dense":
            assert all(e["target"] == "dense" and e["method"] == "sparsegpt" for e in result.data["layers"])
            c1 = next(n for n in report.model.graph.node if n.name == "c1")
            assert len(c1.input) == 3 and weights[c1.input[2]].shape == (16,)  # the corrected bias
            assert [n.op_type for n in report.model.graph.node] == [n.op_type for n in model.graph.node]
        (out,) = run_model(report.model, test)
        errors[name] = float(np.sum((out - ref) ** 2) / np.sum(ref**2))
    assert errors["dense"] < errors["layer"] < errors["magnitude"], errors
    again = compress(model, [make_pass("sparsify_2to4", {})], calibration=calib, batch_size=16)
    assert (
        again.model.SerializeToString()
        == compress(model, [make_pass("sparsify_2to4", {})], calibration=calib, batch_size=16).model.SerializeToString()
    )


def test_dense_layers_opt_in_leaves_the_most_sensitive_layers_dense() -> None:
    model = _mixed_model()
    calib = _data(32, 15)
    report = compress(model, [make_pass("sparsify_2to4", {"dense_layers": 2})], calibration=calib, batch_size=16)
    result = report.result("sparsify_2to4")
    left = result.data["dense_layers"]
    assert len(left) == 2 and len(result.data["layers"]) == 2
    declined = dict(result.declined)
    before = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in report.model.graph.initializer}
    for name in left:
        assert "left dense (dense_layers)" in declined[name]
        np.testing.assert_array_equal(after[f"{name}.w"], before[f"{name}.w"])
    default = compress(model, [make_pass("sparsify_2to4", {})], calibration=calib, batch_size=16)
    assert (
        len(default.result("sparsify_2to4").data["layers"]) == 4
        and "dense_layers" not in default.result("sparsify_2to4").data
    )
