"""Networks inside If / Loop bodies: iteration, export without copies, inspect, fuse, quantize.

Every rewritten model is run in onnxruntime at ORT_DISABLE_ALL and ORT_ENABLE_ALL against the
original on the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import onnxcomp
from onnxcomp import ir
from onnxcomp.analysis.inspect import summarize
from onnxcomp.ir.roundtrip import iter_graph_protos
from tests.real_models import make_inputs, real_model

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray], level: str) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def if_model() -> onnx.ModelProto:
    """``y = Relu(x @ W_branch + b)``; W1, W2 and the shared b1 live in the OUTER scope."""
    rng = np.random.default_rng(0)
    inits = {
        "W1": rng.standard_normal((16, 8)).astype(np.float32),
        "W2": rng.standard_normal((16, 8)).astype(np.float32),
        "b1": rng.standard_normal((8,)).astype(np.float32),
    }

    def branch(tag: str, weight: str) -> onnx.GraphProto:
        nodes = [
            oh.make_node("MatMul", ["x", weight], [f"{tag}_mm"], name=f"{tag}_matmul"),
            oh.make_node("Add", [f"{tag}_mm", "b1"], [f"{tag}_add"], name=f"{tag}_add"),
            oh.make_node("Relu", [f"{tag}_add"], [f"{tag}_y"], name=f"{tag}_relu"),
        ]
        return oh.make_graph(
            nodes, f"{tag}_branch", [], [oh.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, None)]
        )

    node = oh.make_node(
        "If", ["cond"], ["y"], name="the_if", then_branch=branch("then", "W1"), else_branch=branch("else", "W2")
    )
    graph = oh.make_graph(
        [node],
        "if_net",
        [
            oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16]),
            oh.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])],
        initializer=[nh.from_array(v, k) for k, v in inits.items()],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def loop_model() -> onnx.ModelProto:
    """Three iterations of ``v = Relu(BN(Conv(v, W)))`` with W and the BN parameters in the outer scope."""
    rng = np.random.default_rng(1)
    c = 4
    inits = [
        nh.from_array((rng.standard_normal((c, c, 3, 3)) * 0.3).astype(np.float32), "conv_w"),
        nh.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn_scale"),
        nh.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "bn_bias"),
        nh.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "bn_mean"),
        nh.from_array(rng.uniform(0.5, 2.0, c).astype(np.float32), "bn_var"),
        nh.from_array(np.array(3, np.int64), "trips"),
    ]
    body = oh.make_graph(
        [
            oh.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
            oh.make_node("Conv", ["v_in", "conv_w"], ["body_conv_y"], name="body_conv", pads=[1, 1, 1, 1]),
            oh.make_node(
                "BatchNormalization",
                ["body_conv_y", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                ["body_bn_y"],
                name="body_bn",
            ),
            oh.make_node("Relu", ["body_bn_y"], ["v_out"], name="body_relu"),
        ],
        "loop_body",
        [
            oh.make_tensor_value_info("i", TensorProto.INT64, []),
            oh.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            oh.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, c, 6, 6]),
        ],
        [
            oh.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            oh.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, c, 6, 6]),
        ],
    )
    graph = oh.make_graph(
        [
            oh.make_node("Constant", [], ["true"], name="true", value=nh.from_array(np.array(True))),
            oh.make_node("Loop", ["trips", "true", "x"], ["y"], name="the_loop", body=body),
        ],
        "loop_net",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])],
        initializer=inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def _if_feeds(cond: bool) -> dict[str, np.ndarray]:
    x = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)
    return {"x": x, "cond": np.array(cond)}


def _initializer_names(model: onnx.ModelProto) -> list[str]:
    return [t.name for _, g in iter_graph_protos(model.graph) for t in g.initializer]


def _body_ops(model: onnx.ModelProto) -> list[str]:
    return sorted(n.op_type for path, g in iter_graph_protos(model.graph) if path for n in g.node)


def test_iteration_sees_body_nodes_and_names_stay_unique():
    graph = ir.import_model(if_model())
    assert [n.name for n in ir.iter_nodes(graph)] == ["the_if"]
    inside = [n.name for n in ir.iter_nodes(graph, ("MatMul",), subgraphs=True)]
    assert inside == ["else_matmul", "then_matmul"]
    bodies = list(ir.iter_graphs(graph))
    assert [where for _, where in bodies] == [
        "",
        "inside If 'the_if' (else_branch)",
        "inside If 'the_if' (then_branch)",
    ]
    # A name made in a body is unique in the whole model (outer 'x', 'W1' are taken).
    assert ir.unique_name(bodies[1][0], "W1") == "W1_1"
    assert ir.unique_name(graph, "then_mm") == "then_mm_1"


@pytest.mark.parametrize("build", [if_model, loop_model])
def test_export_never_copies_outer_initializers_into_bodies(build):
    model = build()
    out = ir.export_model(ir.import_model(model), model)
    onnx.checker.check_model(out, full_check=True)
    assert sorted(_initializer_names(out)) == sorted(_initializer_names(model))  # each once, none lost
    assert [t.name for t in out.graph.initializer] == [t.name for t in model.graph.initializer]  # declaring scope kept
    # only the producer name ("onnxcomp") and gs's empty name on a Constant node's value differ
    assert out.ByteSize() <= model.ByteSize() + len("onnxcomp") + 2 + 2


def test_inspect_counts_parameters_and_ops_inside_bodies():
    s = summarize(if_model())
    assert s.param_count == 16 * 8 * 2 + 8
    assert s.ops == {"MatMul": 2, "Add": 2, "Relu": 2, "If": 1}
    assert s.extra["subgraphs"][0] == "2 If/Loop/Scan bodies holding 6 of the 7 nodes"
    loop = summarize(loop_model())
    assert loop.param_count == 4 * 4 * 9 + 4 * 4 + 1 + 1  # conv, BN, trip count, the Constant node's bool
    assert loop.ops["BatchNormalization"] == 1 and loop.ops["Loop"] == 1


def test_fuse_rewrites_inside_if_branches(tmp_path):
    src = tmp_path / "if.onnx"
    onnx.save(if_model(), src)
    before = src.read_bytes()
    report = onnxcomp.fuse(src, tmp_path / "fused.onnx")
    assert src.read_bytes() == before
    fused = onnx.load(tmp_path / "fused.onnx")
    assert _body_ops(fused) == ["Gemm", "Gemm", "Relu", "Relu"]
    assert report.result("fuse_matmul_add").stats["fused"] == 2
    assert sorted(_initializer_names(fused)) == ["W1", "W2", "b1"]  # b1 once, not once per branch
    assert (tmp_path / "fused.onnx").stat().st_size <= src.stat().st_size
    for cond in (True, False):
        for level in LEVELS:
            want = run(if_model(), _if_feeds(cond), level)[0]
            got = run(fused, _if_feeds(cond), level)[0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fuse_folds_batchnorm_inside_a_loop_body(tmp_path):
    src = tmp_path / "loop.onnx"
    onnx.save(loop_model(), src)
    report = onnxcomp.fuse(src, tmp_path / "fused.onnx")
    fused = onnx.load(tmp_path / "fused.onnx")
    assert "BatchNormalization" not in _body_ops(fused)
    assert report.result("fold_batchnorm").stats["folded"] == 1
    assert any("inside Loop 'the_loop' (body)" in c for c in report.result("fold_batchnorm").changed)
    x = {"x": np.random.default_rng(2).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    for level in LEVELS:
        np.testing.assert_allclose(run(fused, x, level)[0], run(loop_model(), x, level)[0], rtol=1e-4, atol=1e-4)


def test_weight_only_quantize_inside_if_branches(tmp_path):
    src = tmp_path / "if.onnx"
    onnx.save(if_model(), src)
    report = onnxcomp.quantize(src, tmp_path / "q.onnx", weights="int8", activations="none")
    q = onnx.load(tmp_path / "q.onnx")
    assert _body_ops(q).count("MatMulNBits") == 2
    assert report.result("quantize").stats["nodes"] == 2
    for cond in (True, False):
        want = run(if_model(), _if_feeds(cond), "disable")[0]
        for level in LEVELS:
            got = run(q, _if_feeds(cond), level)[0]
            assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_static_quantize_declines_body_nodes_with_the_reason(tmp_path):
    src = tmp_path / "if.onnx"
    onnx.save(if_model(), src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32), cond=np.array(True))
    report = onnxcomp.quantize(src, tmp_path / "q.onnx", calibration=calib)
    declined = dict(report.result("quantize").declined)
    assert declined["then_matmul"].startswith(
        "inside If 'the_if' (then_branch): calibration cannot tap subgraph tensors"
    )
    assert "--activations none" in declined["else_matmul"]
    q = onnx.load(tmp_path / "q.onnx")
    for level in LEVELS:  # left in float (fused), outputs unchanged
        np.testing.assert_allclose(
            run(q, _if_feeds(True), level)[0], run(if_model(), _if_feeds(True), level)[0], rtol=1e-5, atol=1e-5
        )


# --- the real model: silero-vad's network inside If bodies, state [2, B, 128], scalar sr ----


@pytest.fixture(scope="module")
def silero_if() -> Path:
    return real_model("silero_vad_if")


def test_real_if_model_inspect_and_fuse(silero_if, tmp_path):
    s = summarize(onnx.load(silero_if))
    assert s.param_count > 500_000  # the weights are Constant nodes inside the If bodies
    assert s.ops["Conv"] == 12 and s.ops["LSTM"] == 4
    onnxcomp.fuse(silero_if, tmp_path / "fused.onnx")
    assert (tmp_path / "fused.onnx").stat().st_size <= silero_if.stat().st_size
    feeds = make_inputs("silero_vad_if", n=4, seed=0)
    for level in LEVELS:
        want, got = run(silero_if, feeds, level), run(tmp_path / "fused.onnx", feeds, level)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_real_if_model_weight_only_int8(silero_if, tmp_path):
    report = onnxcomp.quantize(silero_if, tmp_path / "q.onnx", weights="int8", activations="none")
    assert report.result("quantize").stats["Conv"] == 12  # the Convs of both sample-rate branches
    assert (tmp_path / "q.onnx").stat().st_size < 0.7 * silero_if.stat().st_size
    feeds = make_inputs("silero_vad_if", n=8, seed=1)
    want = run(silero_if, feeds, "disable")
    for level in LEVELS:
        got = run(tmp_path / "q.onnx", feeds, level)
        assert np.abs(got[0] - want[0]).max() < 0.02  # speech probabilities
        cosine = float(np.sum(got[1] * want[1]) / (np.linalg.norm(got[1]) * np.linalg.norm(want[1])))
        assert cosine > 0.999  # LSTM state (the int8 STFT Conv moves single values by up to ~0.07)


def test_sparsify_2to4_inside_if_branches_by_magnitude(tmp_path):
    """Bodies get 2:4 by magnitude (no calibration statistic exists inside them), said in a note."""
    from onnxcomp.formats.nm import apply_nm, nm_fraction, parse_pattern

    src = tmp_path / "if.onnx"
    onnx.save(if_model(), src)
    calib = {"x": np.random.default_rng(3).standard_normal((8, 16)).astype(np.float32), "cond": np.array(True)}
    report = onnxcomp.sparsify(src, tmp_path / "s.onnx", pattern="2:4", calibration=calib, batch_axis={"cond": None})
    step = report.result("sparsify_2to4")
    assert step.stats["layers"] == 2 and any("magnitude (calibration cannot tap" in n for n in step.notes)
    out = onnx.load(tmp_path / "s.onnx")
    weights = {t.name: nh.to_array(t) for t in out.graph.initializer}
    pattern = parse_pattern("2:4")
    rng = np.random.default_rng(0)
    originals = {"W1": rng.standard_normal((16, 8)), "W2": rng.standard_normal((16, 8))}
    for cond, name in ((True, "W1"), (False, "W2")):
        w = next(v for k, v in weights.items() if k.startswith(name))
        assert nm_fraction(w, 0, pattern) == 1.0
        np.testing.assert_array_equal(w, apply_nm(originals[name].astype(np.float32), 0, pattern))
        feeds = _if_feeds(cond)
        want = np.maximum(feeds["x"] @ w + weights["b1"], 0)
        for level in LEVELS:
            np.testing.assert_allclose(run(out, feeds, level)[0], want, rtol=1e-5, atol=1e-5)


def test_pruning_and_decomposition_say_they_skip_bodies(tmp_path):
    src = tmp_path / "if.onnx"
    onnx.save(if_model(), src)
    pruned = onnxcomp.sparsify(src, tmp_path / "p.onnx", ratio=0.25)
    declined = dict(pruned.result("prune_channels").declined)
    assert "main graph only" in declined["then_matmul"] and "inside If 'the_if'" in declined["else_matmul"]
    low = onnxcomp.decompose(src, tmp_path / "d.onnx", layers="matmul")
    assert any("main graph only" in reason for _, reason in low.result("decompose_matmul").declined)
