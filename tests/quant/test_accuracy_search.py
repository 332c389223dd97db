"""Sensitivity analysis and the accuracy-target search (quant/fallback.py, quant/tuning.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.analysis.scoring import Scorer
from onnxcomp.api import quantize
from onnxcomp.cli.main import main
from onnxcomp.errors import ConfigError, OnnxCompError
from onnxcomp.quant.fallback import ladder, parse_target, search
from onnxcomp.quant.spec import Granularity, NodeSpec, TensorSpec


def _mlp(bad: int | None = 2, seed: int = 0) -> onnx.ModelProto:
    """Four Linear layers (MatMul + Relu); layer ``bad`` has a few huge weights that ruin its 4-bit grid."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(4):
        w = rng.normal(0, 0.3, (32, 32)).astype(np.float32)
        if i == bad:
            w[rng.integers(0, 32, 6), rng.integers(0, 32, 6)] = 12.0
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], f"fc{i}"))
        out = "y" if i == 3 else f"r{i}"
        if i < 3:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out], f"relu{i}"))
        else:
            nodes[-1].output[0] = "y"
        x = out
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(seed: int = 1, n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (16, 32)).astype(np.float32)} for _ in range(n)]


W4 = {"weights": "int4", "granularity": "channel", "activations": "none", "fuse": False}


def test_parse_target_and_its_errors() -> None:
    assert str(parse_target("cos:0.995")) == "cos:0.995" and parse_target("drop:0.01").metric == "drop"
    for bad in ("cos", "cosine:0.9", "cos:x", "agree:1.5", "drop:-1"):
        with pytest.raises(ConfigError, match="accuracy target"):
            parse_target(bad)


def test_ladders_go_up_in_precision_and_end_in_float() -> None:
    w4a8 = NodeSpec(TensorSpec("int4", Granularity("group", 32)), TensorSpec("uint8", symmetric=False))
    rungs = ladder(w4a8)
    assert rungs[-1] is None and rungs[0] is w4a8
    assert [r.weights.dtype for r in rungs[1:-1] if r is not None][0] == "int8"
    mx = ladder(NodeSpec(TensorSpec("mxfp4", Granularity("group", 32)), None))
    assert [r.weights.dtype if r is not None else None for r in mx] == ["mxfp4", "mxfp8", None]


def test_sensitivity_equals_the_metric_with_only_that_node_quantized() -> None:
    model, calib = _mlp(), _data()
    report = quantize(model, calibration=calib, sensitivity=True, reports=False, **W4)
    rows = {r["node"]: r for r in report.result("quantize").data["sensitivity"]["nodes"]}
    scorer = Scorer(model, calib[:8], "cos")
    for node in ("fc1", "fc2"):
        others = [f"fc{i}" for i in range(4) if f"fc{i}" != node]
        alone = quantize(model, calibration=calib, skip=others, reports=False, **W4).model
        assert rows[node]["only_quantized"] == pytest.approx(scorer.score(alone), abs=1e-12)
        in_float = quantize(model, calibration=calib, skip=[node], reports=False, **W4).model
        assert rows[node]["only_float"] == pytest.approx(scorer.score(in_float), abs=1e-12)
    ranked = report.result("quantize").data["sensitivity"]["nodes"]
    assert ranked[0]["node"] == "fc2"  # the layer built to be bad is the most sensitive


def test_search_meets_the_target_raising_only_the_bad_layer(tmp_path: Path) -> None:
    model, calib = _mlp(), _data()
    scorer = Scorer(model, calib, "cos")
    plain = scorer.score(quantize(model, calibration=calib, reports=False, **W4).model)
    int8 = {"fc2": {"weights": {"dtype": "int8", "granularity": "channel"}, "activations": "none"}}
    fixed = scorer.score(quantize(model, calibration=calib, reports=False, config={"nodes": int8}, **W4).model)
    assert fixed > plain
    out = tmp_path / "q.onnx"
    target = fixed - 0.1 * (fixed - plain)  # reachable by raising the bad layer, not by plain 4-bit
    report = quantize(model, out, calibration=calib, accuracy_target=f"cos:{target}", **W4)
    search_record = report.result("quantize").data["search"]
    assert search_record["met"] and search_record["score"] >= target
    assert "fc2" in search_record["fallback"]
    assert len(search_record["fallback"]) < 4  # not everything fell back
    assert Scorer(model, calib, "cos").score(onnx.load(str(out))) == pytest.approx(search_record["score"], abs=1e-12)
    history = (tmp_path / "q.quant_search.json").read_text()
    assert '"phase"' in history and '"weight_bytes"' in history
    # the resolved config reproduces the model byte for byte
    data = tmp_path / "c.npz"
    np.savez(data, x=np.concatenate([b["x"] for b in calib]))
    again = tmp_path / "again.onnx"
    code = main(
        [
            "quantize", str(_save(model, tmp_path)), "-o", str(again), "--calib", str(data), "--batch-size", "16",
            "--no-fuse", "--config", str(tmp_path / "q.quant_config.toml"), "-q",
        ]
    )  # fmt: skip
    assert code == 0
    assert again.read_bytes() == out.read_bytes()


def _save(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def test_unreachable_target_says_so_and_writes_the_best_found() -> None:
    model, calib = _mlp(), _data()
    pin = {"fc2": {"weights": {"dtype": "int4", "granularity": "channel"}, "activations": "none"}}
    report = quantize(model, calibration=calib, accuracy_target="sqnr:1000", config={"nodes": pin}, **W4)
    step = report.result("quantize")
    assert not step.data["search"]["met"]
    assert any("not met" in n for n in step.notes)


def test_pinned_nodes_are_never_changed() -> None:
    model, calib = _mlp(), _data()
    pin = {"fc2": {"weights": {"dtype": "int4", "granularity": "channel"}, "activations": "none"}}
    report = quantize(model, calibration=calib, accuracy_target="cos:0.99999", config={"nodes": pin}, **W4)
    record = report.result("quantize").data["search"]
    assert "fc2" not in record["fallback"] and record["pinned"] == ["fc2"]


@pytest.mark.parametrize("seed", range(20))
def test_search_never_misses_a_reachable_target(seed: int) -> None:
    """Synthetic monotone scores: whenever the all-raised assignment meets the target, the result does."""
    rng = np.random.default_rng(seed)
    nodes = [f"n{i}" for i in range(int(rng.integers(1, 9)))]
    rungs = {n: int(rng.integers(2, 5)) for n in nodes}
    penalty = {n: rng.uniform(0, 0.2, rungs[n]) for n in nodes}
    for n in nodes:
        penalty[n] = np.sort(penalty[n])[::-1]
        penalty[n][-1] = 0.0  # the top rung (float) costs nothing

    def score(steps: dict[str, int]) -> float:
        return 1.0 - sum(float(penalty[n][steps.get(n, 0)]) for n in nodes)

    threshold = float(rng.uniform(0.5, 1.0))
    sens = {n: 1 - penalty[n][0] for n in nodes}
    result = search(nodes, rungs, sens, score, lambda s: s >= threshold)
    reachable = score({n: rungs[n] - 1 for n in nodes}) >= threshold
    assert result.met == reachable
    if reachable:
        assert score(result.steps) >= threshold and result.score == score(result.steps)


def test_evaluator_errors_are_one_line_and_name_the_file(tmp_path: Path) -> None:
    model, calib = _mlp(), _data()
    broken = tmp_path / "ev.py"
    broken.write_text("def acc(path):\n    raise RuntimeError('labels missing')\n")
    with pytest.raises(OnnxCompError, match=r"ev\.py:acc.*labels missing") as info:
        quantize(model, calibration=calib, accuracy_target="drop:0.01", evaluator=f"{broken}:acc", **W4)
    assert "\n" not in str(info.value)
    with pytest.raises(OnnxCompError, match="has no function 'nope'"):
        quantize(model, calibration=calib, accuracy_target="drop:0.01", evaluator=f"{broken}:nope", **W4)
    good = tmp_path / "good.py"
    good.write_text("import onnx\ndef size(path):\n    return -len(onnx.load(path).graph.node)\n")
    report = quantize(model, calibration=calib, accuracy_target="drop:100", evaluator=f"{good}:size", **W4)
    assert report.result("quantize").data["search"]["met"]


def test_sensitivity_command_writes_report_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model, calib = _mlp(), _data()
    data = tmp_path / "c.npz"
    np.savez(data, x=np.concatenate([b["x"] for b in calib]))
    report, png = tmp_path / "s.json", tmp_path / "s.png"
    code = main(
        [
            "sensitivity", str(_save(model, tmp_path)), "-o", str(report), "--plot", str(png), "--calib", str(data),
            "--no-fuse", "--weights", "int4", "--granularity", "channel", "--activations", "none", "-q",
        ]
    )  # fmt: skip
    assert code == 0 and report.stat().st_size > 0
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert (width, height) == (1400, 900)


def test_sensitivity_on_two_threads_equals_one() -> None:
    model, calib = _mlp(), _data()
    one = quantize(model, calibration=calib, sensitivity=True, reports=False, **W4)
    two = quantize(model, calibration=calib, sensitivity=True, reports=False, trial_workers=2, **W4)
    a, b = (r.result("quantize").data["sensitivity"] for r in (one, two))
    assert a["nodes"] == b["nodes"] and a["curve"] == b["curve"]
    assert one.model.SerializeToString() == two.model.SerializeToString()
