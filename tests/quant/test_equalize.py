"""Cross-layer equalization (onnxcomp/quant/equalize.py): exact in float, evens out channel ranges."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import ir
from onnxcomp.quant.equalize import equalize, find_pairs, input_channel_absmax, output_channel_absmax
from onnxcomp.quant.spec import Granularity, TensorSpec
from onnxcomp.quant.weights import quantize_weight
from onnxcomp.testing import assert_numerically_equal, run_model

W8_TENSOR = TensorSpec("int8", Granularity("tensor"))


def _init(name: str, a: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _model(nodes: list, inputs: dict, outputs: dict, inits: list, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _badly_scaled(r: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Weights whose channels along ``axis`` span three orders of magnitude."""
    gains = np.exp(r.uniform(np.log(0.01), np.log(10.0), shape[axis]))
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return r.standard_normal(shape) * gains.reshape(view)


def _conv_pair(act: str | None, r: np.random.Generator) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1])]
    src = "c"
    inits = [_init("w1", _badly_scaled(r, (8, 3, 3, 3), 0)), _init("b1", r.standard_normal(8))]
    if act == "Clip":
        inits.append(_init("lo", np.float32(0)))
        nodes.append(helper.make_node("Clip", ["c", "lo"], ["a"], name="clip0"))
        src = "a"
    elif act is not None:
        nodes.append(helper.make_node(act, ["c"], ["a"], name="act"))
        src = "a"
    nodes.append(helper.make_node("Conv", [src, "w2", "b2"], ["y"], name="conv2"))
    inits += [_init("w2", r.standard_normal((5, 8, 1, 1))), _init("b2", r.standard_normal(5))]
    return _model(nodes, {"x": [2, 3, 6, 6]}, {"y": [2, 5, 6, 6]}, inits)


def _gemm_pair(r: np.random.Generator, trans_b: int) -> onnx.ModelProto:
    """A well-conditioned MLP written badly: channel i of fc1 times g_i, fc2's input i over g_i."""
    gains = np.exp(r.uniform(np.log(0.01), np.log(10.0), 16))
    w1 = r.standard_normal((16, 12)) * gains[:, None]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=trans_b, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [_init("w1", w1 if trans_b else w1.T), _init("b1", r.standard_normal(16) * gains)]
    inits += [_init("w2", r.standard_normal((6, 16)) / gains), _init("b2", r.standard_normal(6))]
    return _model(nodes, {"x": ["N", 12]}, {"y": ["N", 6]}, inits)


def _mobilenet_block(r: np.random.Generator) -> onnx.ModelProto:
    """1x1 expand -> Relu -> depthwise 3x3 (multiplier 2) -> Relu -> 1x1 project: two chained pairs."""
    nodes = [
        helper.make_node("Conv", ["x", "we", "be"], ["e"], name="expand"),
        helper.make_node("Relu", ["e"], ["ea"], name="relu1"),
        helper.make_node("Conv", ["ea", "wd", "bd"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["da"], name="relu2"),
        helper.make_node("Conv", ["da", "wp"], ["y"], name="project"),
    ]
    inits = [_init("we", _badly_scaled(r, (8, 4, 1, 1), 0)), _init("be", r.standard_normal(8))]
    inits += [_init("wd", _badly_scaled(r, (16, 1, 3, 3), 0)), _init("bd", r.standard_normal(16))]
    inits += [_init("wp", r.standard_normal((6, 16, 1, 1)))]
    return _model(nodes, {"x": [2, 4, 5, 5]}, {"y": [2, 6, 5, 5]}, inits)


def _rewrite(model: onnx.ModelProto, **kw: Any) -> tuple[onnx.ModelProto, list[dict]]:
    graph = ir.import_model(model)
    record = equalize(graph, **kw)
    ir.finalize(graph)
    out = ir.export_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, record


def _same_outputs(model: onnx.ModelProto, rewritten: onnx.ModelProto, seed: int = 0) -> None:
    r = np.random.default_rng(seed)
    feed = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 7 for d in vi.type.tensor_type.shape.dim]
        feed[vi.name] = r.standard_normal(dims).astype(np.float32)
    scale = max(float(np.abs(w).max()) for w in run_model(model, feed, level="disable"))
    assert_numerically_equal(model, rewritten, feed, rtol=1e-4, atol=1e-5 * scale)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


@pytest.mark.parametrize("act", [None, "Relu", "Identity", "LeakyRelu", "Clip"])
def test_conv_pair_is_exact_and_balanced(act: str | None) -> None:
    model = _conv_pair(act, np.random.default_rng(0))
    rewritten, record = _rewrite(model)
    assert len(record) == 1 and record[0]["first"] == "conv1" and record[0]["second"] == "conv2"
    _same_outputs(model, rewritten)
    graph = ir.import_model(rewritten)
    c1, c2 = (next(n for n in graph.nodes if n.name == k) for k in ("conv1", "conv2"))
    r1 = output_channel_absmax(c1, ir.constant_value(c1.inputs[1]))  # type: ignore[arg-type]
    r2 = input_channel_absmax(c2, ir.constant_value(c2.inputs[1]))  # type: ignore[arg-type]
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # one pair: equal ranges after one step
    assert record[0]["w1_spread_after"] < record[0]["w1_spread_before"] / 10
    w, new = _weights(model), _weights(rewritten)
    s = np.abs(w["w1"]).reshape(8, -1).max(1) / np.abs(new["w1"]).reshape(8, -1).max(1)
    np.testing.assert_allclose(new["b1"], w["b1"] / s, rtol=1e-5)
    np.testing.assert_allclose(
        s, np.sqrt(np.abs(w["w1"]).reshape(8, -1).max(1) / np.abs(w["w2"]).max(axis=(0, 2, 3))), rtol=1e-5
    )
    assert record[0]["s_min"] == pytest.approx(s.min(), rel=1e-5) and record[0]["s_max"] == pytest.approx(
        s.max(), rel=1e-5
    )


def test_relu6_is_declined_and_skip_is_honoured() -> None:
    r = np.random.default_rng(1)
    model = _conv_pair("Relu", r)
    relu6 = onnx.ModelProto()
    relu6.CopyFrom(model)
    relu6.graph.initializer.extend([_init("lo", np.float32(0)), _init("hi", np.float32(6))])
    relu6.graph.node[1].CopyFrom(helper.make_node("Clip", ["c", "lo", "hi"], ["a"], name="relu6"))
    onnx.checker.check_model(relu6, full_check=True)
    assert find_pairs(ir.import_model(relu6)) == []
    _, record = _rewrite(model, skip=("conv2*",))
    assert record == []


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_pair_lowers_w8_per_tensor_error(trans_b: int) -> None:
    model = _gemm_pair(np.random.default_rng(2), trans_b)
    rewritten, record = _rewrite(model)
    assert [(e["first"], e["activation"], e["second"]) for e in record] == [("fc1", "Relu", "fc2")]
    _same_outputs(model, rewritten)
    x = np.random.default_rng(3).standard_normal((64, 12))

    def w8_error(m: onnx.ModelProto) -> float:
        w = _weights(m)
        w1 = w["w1"] if trans_b else w["w1"].T  # (16, 12)
        q1 = quantize_weight(w1.astype(np.float32), W8_TENSOR, ir.weight_layout("Gemm", 2, True)).dequantized
        q2 = quantize_weight(w["w2"].astype(np.float32), W8_TENSOR, ir.weight_layout("Gemm", 2, True)).dequantized

        def mlp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.maximum(0.5 * x @ a.T + 2.0 * w["b1"], 0) @ b.T + w["b2"]

        return float(((mlp(w1, w["w2"]) - mlp(q1.astype(np.float64), q2.astype(np.float64))) ** 2).mean())

    before, after = w8_error(model), w8_error(rewritten)
    assert after < 0.5 * before, (after, before)
    assert record[0]["w1_spread_after"] < record[0]["w1_spread_before"]


def test_mobilenet_chain_converges() -> None:
    model = _mobilenet_block(np.random.default_rng(4))
    rewritten, record = _rewrite(model, sweeps=50, tol=1e-6)
    assert [(e["first"], e["second"]) for e in record] == [("expand", "dw"), ("dw", "project")]
    assert record[0]["sweeps"] < 50
    _same_outputs(model, rewritten)
    graph = ir.import_model(rewritten)
    nodes = {n.name: n for n in graph.nodes}

    def w(name: str) -> np.ndarray:
        value = ir.constant_value(nodes[name].inputs[1])
        assert value is not None
        return value

    for first, second in (("expand", "dw"), ("dw", "project")):
        r1 = output_channel_absmax(nodes[first], w(first))
        r2 = input_channel_absmax(nodes[second], w(second))
        np.testing.assert_allclose(r1, r2, rtol=1e-4)  # a fixed point of every pair's step
    for e in record:
        assert e["w1_spread_after"] < e["w1_spread_before"]


def test_shared_weights_are_copied() -> None:
    """Two pairs reading one initializer: each gets its own equalized copy."""
    r = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="a1"),
        helper.make_node("Relu", ["c"], ["h"], name="r1"),
        helper.make_node("Conv", ["h", "w2"], ["y"], name="a2"),
        helper.make_node("Conv", ["x", "w1"], ["d"], name="b1"),
        helper.make_node("Conv", ["d", "w3"], ["z"], name="b2"),
    ]
    inits = [_init("w1", _badly_scaled(r, (6, 3, 1, 1), 0))]
    inits += [_init("w2", r.standard_normal((4, 6, 1, 1))), _init("w3", r.standard_normal((4, 6, 1, 1)) * 5)]
    model = _model(nodes, {"x": [1, 3, 4, 4]}, {"y": [1, 4, 4, 4], "z": [1, 4, 4, 4]}, inits)
    rewritten, record = _rewrite(model)
    assert len(record) == 2
    _same_outputs(model, rewritten)
