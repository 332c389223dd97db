"""SmoothQuant and AWQ (onnxcomp/quant/smooth.py) and the per-channel collector (calibration/channels.py).

Every rewrite is checked against onnxruntime (the float outputs do not change), the scale formula
against numpy, and the searches against brute-force grids built from the library's quantizers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from real_models import make_inputs, real_model

from onnxcomp import ir
from onnxcomp.calibration.channels import ChannelStats
from onnxcomp.calibration.collect import Calibrator
from onnxcomp.formats import get_format
from onnxcomp.model_io import load_model
from onnxcomp.quant.migration import smooth_targets
from onnxcomp.quant.qparams import dequantize, qparams_for_range, quantize
from onnxcomp.quant.smooth import (
    AWQ_GRID,
    SQ_GRID,
    awq,
    awq_scales,
    smooth_scales,
    smoothquant,
)
from onnxcomp.quant.spec import Granularity, NodeSpec, TensorSpec
from onnxcomp.quant.weights import quantize_weight
from onnxcomp.runtime import with_outputs
from onnxcomp.testing import assert_numerically_equal, run_model

W8A8 = NodeSpec(TensorSpec("int8", Granularity("channel")), TensorSpec("uint8", symmetric=False))
W4G32 = NodeSpec(TensorSpec("int4", Granularity("group", 32)), None)


def _init(name: str, a: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _model(nodes: list, inputs: dict, outputs: dict, inits: list) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _outliers(r: np.random.Generator, shape: tuple[int, ...], axis: int, big: float = 30.0) -> np.ndarray:
    """Random activations whose channels (along ``axis``) have very different magnitudes."""
    gains = np.ones(shape[axis])
    gains[:: max(1, shape[axis] // 4)] = big
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return (r.standard_normal(shape) * gains.reshape(view)).astype(np.float32)


# --- one small model per fold site: (model, input name, channel axis, expected fold kind) -----


def _layernorm(r: np.random.Generator) -> onnx.ModelProto:
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1)]
    nodes += [helper.make_node("MatMul", ["h", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(3)]
    inits = [_init("g", r.uniform(0.5, 3, 16) * (1 + 20 * (np.arange(16) % 5 == 0))), _init("b", r.standard_normal(16))]
    inits += [_init(f"w{i}", r.standard_normal((16, 8))) for i in range(3)]
    return _model(nodes, {"x": ["N", 4, 16]}, {f"y{i}": ["N", 4, 8] for i in range(3)}, inits)


def _mul_add(r: np.random.Generator) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Mul", ["x", "m"], ["a"], name="mul"),
        helper.make_node("Add", ["a", "c"], ["h"], name="add"),
        helper.make_node("Relu", ["h"], ["k"], name="relu"),
        helper.make_node("MatMul", ["k", "w"], ["y"], name="mm"),
    ]
    inits = [_init("m", [0.7]), _init("c", r.standard_normal(16)), _init("w", r.standard_normal((16, 8)))]
    return _model(nodes, {"x": [5, 16]}, {"y": [5, 8]}, inits)


def _div(r: np.random.Generator) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Div", ["x", "d"], ["h"], name="div"),
        helper.make_node("Gemm", ["h", "w"], ["y"], name="gemm"),
    ]
    return _model(
        nodes, {"x": [5, 16]}, {"y": [5, 8]}, [_init("d", r.uniform(1, 2, 16)), _init("w", r.standard_normal((16, 8)))]
    )


def _conv_producer(r: np.random.Generator) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["h"], name="relu"),
        helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2_1x1"),
        helper.make_node("Conv", ["h", "w3", "b3"], ["z"], name="conv3_3x3", pads=[1, 1, 1, 1]),
    ]
    inits = [_init("w1", r.standard_normal((8, 3, 3, 3)) * np.repeat([1, 30], 4)[:, None, None, None])]
    inits += [_init("b1", r.standard_normal(8)), _init("w2", r.standard_normal((6, 8, 1, 1)))]
    inits += [_init("w3", r.standard_normal((5, 8, 3, 3))), _init("b3", r.standard_normal(5))]
    return _model(nodes, {"x": [2, 3, 6, 6]}, {"y": [2, 6, 6, 6], "z": [2, 5, 6, 6]}, inits)


def _gemm_producer(r: np.random.Generator) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="gemm1", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="gemm2"),
    ]
    inits = [
        _init("w1", r.standard_normal((16, 12)) * np.repeat([1, 25], 8)[:, None]),
        _init("b1", r.standard_normal(16)),
    ]
    inits += [_init("w2", r.standard_normal((16, 8))), _init("b2", r.standard_normal(8))]
    return _model(nodes, {"x": [5, 12]}, {"y": [5, 8]}, inits)


def _matmul_add_producer(r: np.random.Generator) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Add", ["a", "b1"], ["h"], name="bias1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
    ]
    inits = [
        _init("w1", r.standard_normal((12, 16))),
        _init("b1", r.standard_normal(16)),
        _init("w2", r.standard_normal((16, 8))),
    ]
    return _model(nodes, {"x": ["N", 3, 12]}, {"y": ["N", 3, 8]}, inits)


def _inserted(r: np.random.Generator) -> onnx.ModelProto:
    """LayerNorm feeding two MatMuls and a residual Add: 1/s cannot go into the LayerNorm."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln"),
        helper.make_node("MatMul", ["h", "w0"], ["y0"], name="q"),
        helper.make_node("MatMul", ["h", "w1"], ["y1"], name="k"),
        helper.make_node("Add", ["h", "x"], ["res"], name="residual"),
    ]
    inits = [_init("g", r.uniform(0.5, 3, 16)), _init("b", r.standard_normal(16))]
    inits += [_init("w0", r.standard_normal((16, 8))), _init("w1", r.standard_normal((16, 8)))]
    return _model(nodes, {"x": ["N", 16]}, {"y0": ["N", 8], "y1": ["N", 8], "res": ["N", 16]}, inits)


def _depthwise(r: np.random.Generator) -> onnx.ModelProto:
    """BatchNorm -> depthwise 3x3 (per input channel scale of a grouped conv; fold into BN)."""
    nodes = [
        helper.make_node("BatchNormalization", ["x", "g", "b", "mu", "var"], ["h"], name="bn"),
        helper.make_node("Conv", ["h", "w"], ["y"], name="dw", group=8, pads=[1, 1, 1, 1]),
    ]
    inits = [_init("g", r.uniform(0.5, 3, 8)), _init("b", r.standard_normal(8)), _init("mu", r.standard_normal(8))]
    inits += [_init("var", r.uniform(0.5, 2, 8)), _init("w", r.standard_normal((16, 1, 3, 3)))]
    return _model(nodes, {"x": [2, 8, 5, 5]}, {"y": [2, 16, 5, 5]}, inits)


def _graph_input(r: np.random.Generator) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return _model(nodes, {"x": ["N", 64]}, {"y": ["N", 32]}, [_init("w", r.standard_normal((64, 32)) * 0.1)])


SITES: dict[str, tuple[Callable[[np.random.Generator], onnx.ModelProto], dict[str, str]]] = {
    "layernorm": (_layernorm, {"h": "LayerNormalization"}),
    "mul_add": (_mul_add, {"k": "Mul"}),
    "div": (_div, {"h": "Div"}),
    "conv": (_conv_producer, {"x": "inserted Mul", "h": "Conv"}),
    "gemm": (_gemm_producer, {"x": "inserted Mul", "h": "Gemm"}),
    "matmul_add": (_matmul_add_producer, {"x": "inserted Mul", "h": "MatMul"}),
    "inserted": (_inserted, {"h": "inserted Mul"}),
    "depthwise_bn": (_depthwise, {"h": "BatchNormalization"}),
    "graph_input": (_graph_input, {"x": "inserted Mul"}),
}


def _feeds(model: onnx.ModelProto, seed: int, n: int = 4) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for vi in model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else 6 for d in vi.type.tensor_type.shape.dim]
            feed[vi.name] = _outliers(r, tuple(dims), 1 if len(dims) == 4 else -1)
        out.append(feed)
    return out


def assert_same_outputs(model: onnx.ModelProto, rewritten: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    """Equal within float rounding: rtol 1e-4, atol 1e-5 of each output's largest magnitude."""
    want = run_model(model, feed, level="disable")
    scale = max(float(np.abs(w).max()) for w in want)
    assert_numerically_equal(model, rewritten, feed, rtol=1e-4, atol=1e-5 * scale)


def _calibrate(
    model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], max_rows: int = 256
) -> dict[str, ChannelStats]:
    graph = ir.import_model(model)
    targets = smooth_targets(graph, graph.nodes)
    factories = {t.tensor: partial(ChannelStats, t.axis, max_rows) for t in targets}
    return Calibrator(model, factories).run(batches)


def _rewrite(
    model: onnx.ModelProto, fn: Callable[..., list[dict]], *args: Any, **kw: Any
) -> tuple[onnx.ModelProto, list[dict]]:
    graph = ir.import_model(model)
    record = fn(graph, [n for n in graph.nodes if n.op in ("MatMul", "Gemm", "Conv")], *args, **kw)
    ir.finalize(graph)
    out = ir.export_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, record


@pytest.mark.parametrize("site", list(SITES))
@pytest.mark.parametrize("method", ["sq0.5", "sq-auto", "awq"])
def test_fold_site_keeps_float_outputs(site: str, method: str) -> None:
    build, expected = SITES[site]
    model = build(np.random.default_rng(0))
    batches = _feeds(model, 1)
    stats = _calibrate(model, batches)
    if method == "awq":
        rewritten, record = _rewrite(model, awq, stats, lambda n: W4G32)
    else:
        rewritten, record = _rewrite(model, smoothquant, stats, 0.5 if method == "sq0.5" else "auto", lambda n: W8A8)
    folds = {e["tensor"]: e["fold"]["kind"] for e in record if e.get("applied", True)}
    if method != "awq":
        assert folds == expected
    else:
        assert set(folds.items()) <= set(expected.items())
    for feed in _feeds(model, 2, 2):
        assert_same_outputs(model, rewritten, feed)


def test_shared_group_scale_matches_numpy() -> None:
    model = _layernorm(np.random.default_rng(3))
    batches = _feeds(model, 4)
    stats = _calibrate(model, batches)
    probe = with_outputs(model, ["h"])
    x = np.concatenate([run_model(probe, b, level="disable")[-1].reshape(-1, 16) for b in batches])
    ws = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("w")]
    for alpha in (0.0, 0.3, 0.5, 0.85, 1.0):
        act = np.abs(x).max(axis=0).astype(np.float64)
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0).astype(np.float64)
        want = np.clip(act**alpha / wmax ** (1 - alpha), 1e-5, 1e5).astype(np.float32)
        np.testing.assert_array_equal(smooth_scales(stats["h"].amax(), wmax, alpha), want.astype(np.float64))
    rewritten, record = _rewrite(model, smoothquant, stats, 0.5)
    assert len(record) == 3 and {e["group"][0] for e in record} == {"mm0"}
    s = smooth_scales(np.abs(x).max(axis=0), np.max([np.abs(w).max(axis=1) for w in ws], axis=0), 0.5)
    new = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    for i, w in enumerate(ws):
        np.testing.assert_allclose(new[f"w{i}"], w * s[:, None], rtol=1e-6)
    gamma = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "g"))
    np.testing.assert_allclose(new["g"], gamma / s, rtol=1e-6)
    assert record[0]["s_min"] == pytest.approx(s.min()) and record[0]["s_max"] == pytest.approx(s.max())


def _act_qdq(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    fmt = get_format("uint8")
    scale, zp = qparams_for_range(fmt, lo, hi, False)  # type: ignore[arg-type]
    return dequantize(fmt, quantize(fmt, x.astype(np.float32), scale, zp), scale, zp).astype(np.float64)  # type: ignore[arg-type]


def _w8a8_error(x: np.ndarray, w: np.ndarray, s: np.ndarray, lo: float, hi: float) -> float:
    """||x w - Qa(x/s) Qw(s w)||^2 with per-tensor uint8 activations on [lo, hi] and int8 per-channel weights."""
    ws = (w.astype(np.float64) * s[:, None]).astype(np.float32)
    wq = quantize_weight(ws, W8A8.weights, ir.weight_layout("MatMul", 2)).dequantized.astype(np.float64)  # type: ignore[arg-type]
    diff = x.astype(np.float64) @ w.astype(np.float64) - _act_qdq(x / s, lo, hi) @ wq
    return float((diff**2).sum())


def test_smoothquant_lowers_w8a8_error_with_outlier_channels() -> None:
    model = _graph_input(np.random.default_rng(5))
    batches = _feeds(model, 6, 8)
    stats = _calibrate(model, batches)
    w = numpy_helper.to_array(model.graph.initializer[0])
    rewritten, record = _rewrite(model, smoothquant, stats, 0.5)
    new = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    inv = next(v for k, v in new.items() if k != "w")
    s = 1.0 / inv.astype(np.float64)
    np.testing.assert_allclose(new["w"], w * s[:, None], rtol=1e-6)
    # The simulated W8A8 output error on the calibration rows (static range: their min/max).
    calib = np.concatenate([b["x"] for b in batches])
    plain = _w8a8_error(calib, w, np.ones(64), float(calib.min()), float(calib.max()))
    xs = calib / s
    smoothed = _w8a8_error(calib, w, s, float(xs.min()), float(xs.max()))
    assert smoothed < 0.5 * plain, (smoothed, plain)


def test_auto_alpha_is_the_brute_force_argmin() -> None:
    model = _graph_input(np.random.default_rng(8))
    stats = _calibrate(model, _feeds(model, 9, 8), max_rows=128)
    rows = stats["x"].rows().astype(np.float64)
    w = numpy_helper.to_array(model.graph.initializer[0])
    amax, wmax = np.abs(rows).max(axis=0), np.abs(w).max(axis=1)
    losses = []
    for a in SQ_GRID:
        s = smooth_scales(stats["x"].amax(), wmax, a)
        xs = rows / s
        losses.append(_w8a8_error(rows, w, s, float(xs.min()), float(xs.max())))
    assert amax.shape == (64,)
    _, record = _rewrite(model, smoothquant, stats, "auto", lambda n: W8A8)
    assert record[0]["alpha"] == SQ_GRID[int(np.argmin(losses))]
    assert record[0]["loss"] == pytest.approx(min(losses), rel=1e-6)
    assert record[0]["loss"] < record[0]["loss_unsmoothed"]


def test_awq_beats_round_to_nearest_on_int4_g32() -> None:
    r = np.random.default_rng(10)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        {"x": ["N", 128]},
        {"y": ["N", 64]},
        [_init("w", r.standard_normal((128, 64)) * 0.05)],
    )
    batches = _feeds(model, 11, 8)
    stats = _calibrate(model, batches, max_rows=256)
    rewritten, record = _rewrite(model, awq, stats, lambda n: W4G32)
    assert record[0]["applied"] and record[0]["alpha"] in AWQ_GRID and record[0]["alpha"] > 0
    assert record[0]["loss_after"] <= record[0]["loss_before"]
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    new = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    s = 1.0 / new[next(k for k in new if k != "w")].astype(np.float64)
    np.testing.assert_allclose(s, awq_scales(stats["x"].mean_abs(), record[0]["alpha"]), rtol=1e-6)
    layout = ir.weight_layout("MatMul", 2)
    held = np.concatenate([b["x"] for b in _feeds(model, 12, 4)]).astype(np.float64)
    rtn = quantize_weight(w.astype(np.float32), W4G32.weights, layout).dequantized  # type: ignore[arg-type]
    scaled = quantize_weight(new["w"], W4G32.weights, layout).dequantized / s[:, None]  # type: ignore[arg-type]
    err_rtn = float(((held @ w - held @ rtn) ** 2).sum())
    err_awq = float(((held @ w - held @ scaled) ** 2).sum())
    assert err_awq < err_rtn, (err_awq, err_rtn)


def test_mixed_readers_and_non_candidates() -> None:
    """A Conv and a MatMul reading one tensor: two groups, each with its own inserted Mul."""
    r = np.random.default_rng(13)
    model = _model(
        [
            helper.make_node("Conv", ["x", "wc"], ["c"], name="conv"),
            helper.make_node("MatMul", ["x", "wm"], ["m"], name="mm"),
            helper.make_node("MatMul", ["x", "x"], ["xx"], name="act_act"),
        ],
        {"x": [4, 4, 4, 4]},
        {"c": [4, 3, 4, 4], "m": [4, 4, 4, 2], "xx": [4, 4, 4, 4]},
        [_init("wc", r.standard_normal((3, 4, 1, 1))), _init("wm", r.standard_normal((4, 2)))],
    )
    graph = ir.import_model(model)
    targets = smooth_targets(graph, graph.nodes)
    assert sorted((t.axis, [n.name for n in t.nodes]) for t in targets) == [(-1, ["mm"]), (1, ["conv"])]
    assert all(t.fold.kind == "inserted Mul" for t in targets)


# --- the collector ---------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, -1])
def test_channel_stats_merge_exactly(axis: int) -> None:
    r = np.random.default_rng(14)
    x = (r.standard_normal((12, 6, 5)) * np.exp(3 * r.standard_normal((1, 6, 5)))).astype(np.float32)
    x[0, 0, 0] = 1e-41  # a subnormal
    one = ChannelStats(axis, max_rows=9)
    one.update(x)
    several = ChannelStats(axis, max_rows=9)
    for i in range(0, 12, 5):
        several.update(x[i : i + 5])
    first, second = ChannelStats(axis, max_rows=9), ChannelStats(axis, max_rows=9)
    first.update(x[7:])
    second.update(x[:7])
    first.merge(second)
    channels = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)
    for other in (several, first):
        np.testing.assert_array_equal(other.amax(), one.amax())
        np.testing.assert_array_equal(other.mean_abs(), one.mean_abs())
        np.testing.assert_array_equal(other.rows(), one.rows())
        assert other.count == one.count == channels.shape[0]
    np.testing.assert_array_equal(one.amax(), np.abs(channels).max(axis=0))
    np.testing.assert_allclose(one.mean_abs(), np.abs(channels).mean(axis=0), rtol=1e-14)
    assert one.rows().shape == (9, x.shape[axis])
    kept = {row.tobytes() for row in np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])}
    assert all(row.tobytes() in kept for row in one.rows())


# --- a real transformer -------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_float_outputs_unchanged() -> None:
    """SmoothQuant (alpha 0.5 everywhere, auto on layer 0) and AWQ (layer 0) on MiniLM-L3: same outputs."""
    model = load_model(real_model("minilm_l3"))
    feeds = make_inputs("minilm_l3", 8, 0)
    batches = [{k: v[i : i + 4] for k, v in feeds.items()} for i in (0, 4)]
    held = make_inputs("minilm_l3", 4, 1)
    want = run_model(model, held, level="disable")
    graph = ir.import_model(model)
    targets = smooth_targets(graph, [n for n in graph.nodes if n.op == "MatMul"])
    assert len(targets) == 12 and sum(len(t.nodes) for t in targets) == 18
    assert {t.fold.kind for t in targets} == {"inserted Mul", "Mul"}  # LayerNorm outputs also feed residuals
    stats = Calibrator(model, {t.tensor: partial(ChannelStats, t.axis, 128) for t in targets}).run(batches)
    layer0 = "*/layer.0/*"
    runs: list[tuple[Callable[..., list[dict]], tuple, str]] = [
        (smoothquant, (stats, 0.5), "*"),
        (smoothquant, (stats, "auto", lambda n: W8A8), layer0),
        (awq, (stats, lambda n: W4G32), layer0),
    ]
    for fn, args, glob in runs:
        g = ir.import_model(model)
        nodes = [n for n in g.nodes if n.op == "MatMul" and ir.match_glob(n.name, (glob,))]
        record = fn(g, nodes, *args)
        assert record
        ir.finalize(g)
        got = run_model(ir.export_model(g, model), held, level="disable")
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
