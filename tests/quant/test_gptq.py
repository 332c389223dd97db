"""GPTQ (``onnxcomp.quant.gptq``) and the Hessian machinery it stands on (``onnxcomp.calibration.gram``).

The design matrix of a layer times its flattened weight must be the layer's output as onnxruntime
computes it; the streamed, merged ``X^T X`` must equal one pass over all the data; the damped
inverse Cholesky factor must match a plain numpy reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import ir
from onnxcomp.calibration.gram import InputGram, damped_inverse_cholesky, design_rows, row_count
from onnxcomp.errors import ConfigError
from onnxcomp.formats import get_format
from onnxcomp.quant.gptq import fixed_grid, gptq_quantize
from onnxcomp.quant.qweight import QuantizedWeight
from onnxcomp.quant.spec import Granularity, TensorSpec
from onnxcomp.quant.weights import quantize_weight
from onnxcomp.testing import run_model

# --- layers as single-node graphs --------------------------------------------------------------


def _layer(op: str, x_shape: tuple[int, ...], w: np.ndarray, **attrs: Any) -> tuple[onnx.ModelProto, ir.Node]:
    inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    node = helper.make_node(op, ["x", "W"], ["y"], name="layer", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = ir.import_model(model)
    return model, g.nodes[0]


def _flat(op: str, w: np.ndarray, **attrs: Any) -> np.ndarray:
    """The weight as (d, Cout): the matrix the design rows multiply."""
    if op == "Conv":
        return w.reshape(w.shape[0], -1).T
    if op == "Gemm" and attrs.get("transB", 0):
        return w.T
    return w


@pytest.mark.parametrize(
    ("op", "x_shape", "w_shape", "attrs"),
    [
        ("Conv", (2, 3, 7, 6), (4, 3, 3, 3), {"pads": [1, 0, 1, 2], "strides": [2, 1]}),
        ("Conv", (1, 2, 9, 9), (3, 2, 3, 2), {"dilations": [2, 1], "pads": [2, 0, 1, 1]}),
        ("Conv", (1, 2, 8, 7), (3, 2, 3, 2), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
        ("Gemm", (5, 6), (6, 4), {}),
        ("Gemm", (5, 6), (4, 6), {"transB": 1}),
        ("Gemm", (6, 5), (6, 4), {"transA": 1}),
        ("MatMul", (2, 3, 6), (6, 4), {}),
    ],
)
def test_design_rows_times_weight_is_the_layer_output(op: str, x_shape: tuple, w_shape: tuple, attrs: dict) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32)
    model, node = _layer(op, x_shape, w, **attrs)
    (y,) = run_model(model, {"x": x})
    index = np.arange(row_count(node, x.shape))
    got = design_rows(node, x, index) @ _flat(op, w, **attrs).astype(np.float64)
    want = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]) if op == "Conv" else y.reshape(-1, y.shape[-1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_grouped_conv_gets_one_block_per_group() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)  # group 3: 6 input channels, 2 per group
    x = rng.standard_normal((2, 6, 5, 5)).astype(np.float32)
    model, node = _layer("Conv", x.shape, w, group=3, pads=[1, 1, 1, 1])
    (y,) = run_model(model, {"x": x})
    gram = InputGram(node)
    gram.update(x)
    blocks = gram.blocks()
    assert blocks.shape == (3, 18, 18)
    rows = design_rows(node, x.astype(np.float64), np.arange(row_count(node, x.shape))).reshape(-1, 3, 18)
    for g in range(3):
        np.testing.assert_allclose(blocks[g], rows[:, g].T @ rows[:, g] / len(rows), rtol=1e-12)
        out = rows[:, g] @ w[2 * g : 2 * g + 2].reshape(2, -1).T
        np.testing.assert_allclose(out, np.moveaxis(y, 1, -1).reshape(-1, 6)[:, 2 * g : 2 * g + 2], atol=1e-4)
    with pytest.raises(Exception, match="groups"):
        gram.hessian()


def _conv_batches(count: int, dyadic: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    if dyadic:  # multiples of 1/8 in [-2, 2]: every float64 sum below is exact, in any order
        return [rng.integers(-16, 17, (2, 3, 6, 6)).astype(np.float32) / 8 for _ in range(count)]
    return [rng.standard_normal((2, 3, 6, 6)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("dyadic", [True, False])
def test_hessian_one_pass_equals_merged_halves_and_batching(dyadic: bool) -> None:
    w = np.zeros((4, 3, 3, 3), np.float32)
    _, node = _layer("Conv", (2, 3, 6, 6), w, pads=[1, 1, 1, 1])
    batches = _conv_batches(4, dyadic)
    whole = InputGram(node)
    for b in batches:
        whole.update(b)
    first, second = InputGram(node), InputGram(node)
    for b in batches[:2]:
        first.update(b)
    for b in batches[2:]:
        second.update(b)
    first.merge(second)
    single = InputGram(node)
    single.update(np.concatenate(batches))
    assert whole.rows == first.rows == single.rows == 4 * 2 * 36
    if dyadic:
        np.testing.assert_array_equal(first.hessian(), whole.hessian())
        np.testing.assert_array_equal(single.hessian(), whole.hessian())
    else:
        np.testing.assert_allclose(first.hessian(), whole.hessian(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(single.hessian(), whole.hessian(), rtol=1e-12, atol=1e-14)
    rows = design_rows(node, np.concatenate(batches), np.arange(whole.rows))
    np.testing.assert_allclose(whole.hessian(), rows.T @ rows / len(rows), rtol=1e-12, atol=1e-14)
    assert whole.hessian().dtype == np.float64 and whole.hessian().shape == (27, 27)


def test_row_subsampling_bounds_rows_and_is_seeded() -> None:
    w = np.zeros((4, 3, 3, 3), np.float32)
    _, node = _layer("Conv", (2, 3, 6, 6), w, pads=[1, 1, 1, 1])
    a, b = InputGram(node, max_rows=10, seed=5), InputGram(node, max_rows=10, seed=5)
    for x in _conv_batches(3, False):
        a.update(x)
        b.update(x)
    assert a.rows == 30
    np.testing.assert_array_equal(a.hessian(), b.hessian())


def _reference_inverse_cholesky(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    return np.linalg.inv(h), dead


def test_damped_inverse_cholesky_matches_reference_with_dead_columns() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 6)) @ rng.standard_normal((6, 6))
    x[:, 2] = 0.0  # a dead input
    h = x.T @ x / len(x)
    for damp in (0.0, 0.01, 0.5):
        u = damped_inverse_cholesky(h, damp)
        inverse, dead = _reference_inverse_cholesky(h, damp)
        assert dead.tolist() == [False, False, True, False, False, False]
        np.testing.assert_allclose(np.triu(u), u)
        np.testing.assert_allclose(u.T @ u, inverse, rtol=1e-9, atol=1e-12)
        assert (np.diag(u) > 0).all()


# --- GPTQ --------------------------------------------------------------------------------------

ROWS_LAYOUT = ir.WeightLayout(0, 1)  # (Cout, K): a Gemm transB weight


def _correlated_inputs(n: int, d: int, seed: int) -> np.ndarray:
    """Inputs with a few dominant directions (and per-channel offsets), as real activations have."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4, d)) * np.array([[4.0], [2.0], [1.0], [0.5]])
    return rng.standard_normal((n, 4)) @ basis + 0.1 * rng.standard_normal((n, d)) + rng.standard_normal(d) * 0.3


def _output_error(x: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
    diff = x @ (w.astype(np.float64) - wq.astype(np.float64)).T
    return float(np.sum(diff * diff))


def _expand(p: np.ndarray, shape: tuple[int, ...], axis: int | None, block: int) -> np.ndarray:
    p = np.asarray(p, np.float32)
    if p.ndim == 0 or axis is None:
        return np.full(shape, p.reshape(()), np.float32)
    if block:
        return np.repeat(p, block, axis=axis)[tuple(slice(0, n) for n in shape)]
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(p.reshape(view), shape)


def _decode(qw: QuantizedWeight, layout: ir.WeightLayout) -> np.ndarray:
    """What the emitted dequantization computes from the stored codes (float32, numpy)."""
    shape = qw.codes.shape
    codes = np.asarray(qw.codes).astype(np.float32)
    if qw.storage == "dq2":  # DQ(fp8 group-scale codes, channel scale) -> blocked DQ(codes, group scales)
        assert qw.group_scale_codes is not None
        channel = _expand(qw.scale, qw.group_scale_codes.shape, layout.channel_axis, 0)
        group = np.multiply(np.asarray(qw.group_scale_codes).astype(np.float32), channel, dtype=np.float32)
        return np.multiply(codes, _expand(group, shape, qw.axis, qw.block_size), dtype=np.float32)
    scale = _expand(qw.scale, shape, qw.axis, qw.block_size)
    if qw.storage == "lut":
        return np.multiply(get_format("hif8").decode(qw.codes), scale, dtype=np.float32)
    if qw.storage == "lut_dq":
        table = np.rint(get_format("fp4_e2m1").decode(np.arange(16, dtype=np.uint8)) * 2).astype(np.float32)
        return np.multiply(table[np.asarray(qw.codes, np.uint8)], scale, dtype=np.float32)
    assert qw.zero_point is not None
    zero = _expand(np.asarray(qw.zero_point).astype(np.float32), shape, qw.axis, qw.block_size)
    return np.multiply(codes - zero, scale, dtype=np.float32)


SPECS = [
    *(
        TensorSpec(dt, Granularity(kind, size), symmetric=dt.startswith("int"))
        for dt in ("int8", "uint8", "int4", "uint4")
        for kind, size in (("tensor", 0), ("channel", 0), ("group", 32))
    ),
    TensorSpec("fp8_e4m3", Granularity("tensor")),
    TensorSpec("fp8_e4m3", Granularity("channel")),
    TensorSpec("fp8_e5m2", Granularity("channel")),
    TensorSpec("hif8", Granularity("channel")),
    TensorSpec("fp4_e2m1", Granularity("group", 32)),
    TensorSpec("fp4_e1m2", Granularity("group", 32)),
    TensorSpec("fp4_e2m1", Granularity("group", 32), scale_format="fp8_e4m3"),
    TensorSpec("fp4_e1m2", Granularity("group", 16), scale_format="fp8_e4m3"),
    TensorSpec("mxfp8", Granularity("group", 32)),
    TensorSpec("mxfp4", Granularity("group", 32)),
]
CASES = [(s, "int8") for s in SPECS] + [
    (TensorSpec("fp4_e2m1", Granularity("group", 32)), "uint4_lut"),
    (TensorSpec("fp4_e2m1", Granularity("channel")), "float4e2m1"),
    (TensorSpec("mxfp4", Granularity("group", 32)), "uint4_lut"),
    (TensorSpec("int4", Granularity("channel"), observer="mse"), "int8"),
]
ERRORS: dict[str, tuple[float, float]] = {}


@pytest.mark.parametrize(("spec", "storage"), CASES, ids=lambda c: c.describe() if isinstance(c, TensorSpec) else c)
def test_gptq_lowers_output_error_on_the_rtn_grid(spec: TensorSpec, storage: str) -> None:
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((12, 96)) * 0.5).astype(np.float32)
    x = _correlated_inputs(600, 96, seed=12)
    h = x.T @ x / len(x)
    rtn = quantize_weight(w, spec, ROWS_LAYOUT, "w", storage)
    # the fixed grid reproduces round-to-nearest exactly
    grid = fixed_grid(rtn, w.shape, ROWS_LAYOUT, storage)
    np.testing.assert_array_equal(grid.round(w)[1], rtn.dequantized)
    qw = gptq_quantize(w, spec, ROWS_LAYOUT, h, name="w", fp4_storage=storage)
    # same storage, scales and zero points; codes valid; dequantized is what DQ computes
    assert (qw.storage, qw.axis, qw.block_size, qw.codes.dtype, qw.codes.shape) == (
        rtn.storage,
        rtn.axis,
        rtn.block_size,
        rtn.codes.dtype,
        rtn.codes.shape,
    )
    np.testing.assert_array_equal(qw.scale, rtn.scale)
    if rtn.zero_point is not None:
        assert qw.zero_point is not None
        np.testing.assert_array_equal(
            np.asarray(qw.zero_point).astype(np.float32), np.asarray(rtn.zero_point).astype(np.float32)
        )
    if rtn.group_scale_codes is not None:
        assert qw.group_scale_codes is not None
        np.testing.assert_array_equal(qw.group_scale_codes.view(np.uint8), rtn.group_scale_codes.view(np.uint8))
    np.testing.assert_array_equal(_decode(qw, ROWS_LAYOUT), qw.dequantized)
    np.testing.assert_array_equal(_decode(rtn, ROWS_LAYOUT), rtn.dequantized)
    assert np.isfinite(qw.dequantized).all()
    # every value is on the grid: rounding it again changes nothing
    np.testing.assert_array_equal(grid.round(qw.dequantized)[1], qw.dequantized)
    e_rtn, e_gptq = _output_error(x, w, rtn.dequantized), _output_error(x, w, qw.dequantized)
    ERRORS[f"{spec.describe()}/{spec.scale_format or '-'}/{storage}"] = (e_rtn, e_gptq)
    assert e_gptq <= e_rtn
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


def _round_int4(v: float, scale: np.float32) -> float:
    return float(np.clip(np.rint(np.float32(v) / scale), -8, 7) * scale)


def _reference_obq(w: np.ndarray, h: np.ndarray, scale: np.float32, order: list[int]) -> np.ndarray:
    """The optimal-brain-quantizer recursion, written out: round, update the rest, drop the column."""
    w = w.astype(np.float64).copy()
    hinv = np.linalg.inv(h)
    q = np.zeros_like(w)
    remaining = list(order)
    for j in order:
        q[j] = _round_int4(w[j], scale)
        err = (w[j] - q[j]) / hinv[j, j]
        w -= err * hinv[:, j]  # w_j itself becomes q_j
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
        remaining.remove(j)
    return q


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("damp", [0.0, 0.1])
def test_gptq_matches_a_brute_force_obq_reference(act_order: bool, damp: float) -> None:
    rng = np.random.default_rng(4)
    x = _correlated_inputs(40, 4, seed=5) * np.array([1.0, 3.0, 0.5, 2.0])
    h = x.T @ x / len(x)
    spec = TensorSpec("int4", Granularity("tensor"))
    for trial in range(20):
        w = (rng.standard_normal((1, 4)) * 0.7).astype(np.float32)
        rtn = quantize_weight(w, spec, ROWS_LAYOUT)
        scale = np.float32(rtn.scale)
        damped = h + damp * np.mean(np.diag(h)) * np.eye(4)
        order = list(np.argsort(-np.diag(h), kind="stable")) if act_order else [0, 1, 2, 3]
        want = _reference_obq(w[0], damped, scale, order)
        for block in (1, 2, 128):
            got = gptq_quantize(w, spec, ROWS_LAYOUT, h, act_order=act_order, damp=damp, block=block)
            np.testing.assert_allclose(got.dequantized[0], want, rtol=0, atol=1e-6, err_msg=f"trial {trial}")


def test_heavy_damping_falls_back_to_round_to_nearest_and_singular_h_still_works() -> None:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    x = _correlated_inputs(30, 64, seed=7)  # 30 rows: H has rank <= 30 of 64
    x[:, 5] = 0.0  # a dead input column keeps its RTN code
    h = x.T @ x / len(x)
    spec = TensorSpec("int4", Granularity("channel"))
    rtn = quantize_weight(w, spec, ROWS_LAYOUT)
    damped = gptq_quantize(w, spec, ROWS_LAYOUT, h, damp=1e9)
    np.testing.assert_array_equal(damped.dequantized, rtn.dequantized)
    undamped = gptq_quantize(w, spec, ROWS_LAYOUT, h, damp=0.0)
    np.testing.assert_array_equal(undamped.dequantized[:, 5], rtn.dequantized[:, 5])
    assert _output_error(x, w, undamped.dequantized) < _output_error(x, w, rtn.dequantized)


def test_act_order_keeps_static_groups_and_beats_rtn() -> None:
    rng = np.random.default_rng(8)
    w = rng.standard_normal((10, 64)).astype(np.float32)
    x = _correlated_inputs(400, 64, seed=9) * np.geomspace(0.1, 10, 64)
    h = x.T @ x / len(x)
    spec = TensorSpec("int4", Granularity("group", 16))
    rtn = quantize_weight(w, spec, ROWS_LAYOUT)
    plain = gptq_quantize(w, spec, ROWS_LAYOUT, h)
    ordered = gptq_quantize(w, spec, ROWS_LAYOUT, h, act_order=True)
    np.testing.assert_array_equal(ordered.scale, rtn.scale)
    e = [_output_error(x, w, q.dequantized) for q in (rtn, plain, ordered)]
    assert e[2] < e[0] and e[1] < e[0], e


def test_conv_and_grouped_conv_weights_use_the_matrix_view() -> None:
    rng = np.random.default_rng(10)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)  # group 3
    x = rng.standard_normal((2, 6, 8, 8)).astype(np.float32)
    x = x + 0.8 * x[:, :1]  # correlated channels
    _, node = _layer("Conv", x.shape, w, group=3, pads=[1, 1, 1, 1])
    gram = InputGram(node)
    gram.update(x)
    layout = ir.WeightLayout(0, 1)
    spec = TensorSpec("int4", Granularity("channel"))
    qw = gptq_quantize(w, spec, layout, gram.blocks())
    for g in range(3):  # each group is its own GPTQ problem
        part = gptq_quantize(w[2 * g : 2 * g + 2], spec, layout, gram.blocks()[g])
        np.testing.assert_array_equal(qw.dequantized[2 * g : 2 * g + 2], part.dequantized)
    rows = design_rows(node, x, np.arange(row_count(node, x.shape))).reshape(-1, 3, 18)
    rtn = quantize_weight(w, spec, layout)

    def err(wq: np.ndarray) -> float:
        return sum(
            _output_error(rows[:, g], w[2 * g : 2 * g + 2].reshape(2, -1), wq[2 * g : 2 * g + 2].reshape(2, -1))
            for g in range(3)
        )

    assert err(qw.dequantized) < err(rtn.dequantized)
    with pytest.raises(ConfigError, match="Hessian"):
        gptq_quantize(w, spec, layout, np.eye(5))


def test_report_errors() -> None:
    """Prints the GPTQ vs RTN output errors measured above (run with -s)."""
    for key, (e_rtn, e_gptq) in ERRORS.items():
        print(f"{key:40s} rtn {e_rtn:10.4g}  gptq {e_gptq:10.4g}  ratio {e_gptq / e_rtn:.3f}")
