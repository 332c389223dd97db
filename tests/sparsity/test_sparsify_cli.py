"""`onnxcomp sparsify`, the Python API and recipes; the demo and a real CNN end to end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp.analysis.metrics import accuracy, predict
from onnxcomp.api import compress, fuse, sparsify
from onnxcomp.cli.main import main
from onnxcomp.model_io import load_model
from onnxcomp.runtime import ort_session
from onnxcomp.sparsity.report import compare_models
from onnxcomp.testing import run_model

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"


def test_cli_pattern(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.onnx"
    assert main(["sparsify", str(DEMO), "-o", str(out), "--pattern", "2:4"]) == 0
    text = capsys.readouterr().out
    assert "2:4 pattern holds on 100.00% of the groups" in text and "conv2: 2:4 on 100.0% of groups" in text
    assert "parameters" in text and "MACs (batch 1)" in text and "size" in text
    assert "no n:m sparse kernel" in text  # says what 2:4 changes on onnxruntime: not size or speed
    figures = compare_models(load_model(DEMO), load_model(out))
    nonzero = figures["nonzero"]
    assert nonzero["after"] is not None and nonzero["before"] is not None
    assert 0.45 < nonzero["after"] / nonzero["before"] < 0.55  # the sparsified layers hold almost every weight
    assert main(["inspect", str(out)]) == 0
    assert "fc1 (Gemm fc1.weight): 50.0% zeros, 2:4 on 100.0% of groups" in capsys.readouterr().out


def test_cli_prune_with_calibration_then_int4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.onnx"
    args = [
        "sparsify",
        str(DEMO),
        "-o",
        str(out),
        "--ratio",
        "0.25",
        "--calib",
        str(CALIB),
        "--round-to",
        "4",
        "--quantize",
        "int4",
        "--layer-ratio",
        "fc1=0.5",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "conv2: 32 -> 24 channels, consumers' output error" in text and "fc1: 64 -> 32 channels" in text
    record = json.loads(out.with_name("p.sparsity_record.json").read_text())
    assert {e["node"]: e["channels_after"] for e in record["layers"]} == {
        "conv1": 12,
        "conv2": 24,
        "conv3": 48,
        "conv4": 48,
        "fc1": 32,
    }
    quant = json.loads(out.with_name("p.quant_record.json").read_text())
    assert {e["weights"]["dtype"] for e in quant} == {"int4"}
    assert "prune_channels" in out.with_name("p.recipe.toml").read_text()


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.onnx")
    with pytest.raises(SystemExit) as exc:
        main(["sparsify", str(DEMO), "-o", out])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["sparsify", str(DEMO), "-o", out, "--pattern", "2:4", "--ratio", "0.3"])
    assert exc.value.code == 2
    assert main(["sparsify", str(DEMO), "-o", out, "--ratio", "1.5"]) == 1
    assert main(["sparsify", str(DEMO), "-o", out, "--ratio", "0.3", "--criterion", "data"]) == 1
    assert "needs calibration data" in capsys.readouterr().err


def test_recipe_toml(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[passes]]\npass = "fold_batchnorm"\n\n[[passes]]\npass = "prune_channels"\nratio = 0.5\n'
        'criterion = "data"\nround_to = 8\n\n[[passes]]\npass = "quantize"\nactivations = "none"\n'
        'weights = { dtype = "int8", granularity = "channel" }\n'
    )
    report = compress(DEMO, recipe, tmp_path / "r.onnx", calibration=CALIB)
    assert report.result("prune_channels").stats["channels_after"] == 8 + 16 + 32 + 32 + 32
    again = compress(DEMO, tmp_path / "r.recipe.toml", tmp_path / "r2.onnx", calibration=CALIB)
    assert again.model.SerializeToString() == report.model.SerializeToString()


def _fastest_ms(models: list[onnx.ModelProto], feeds: dict[str, np.ndarray], rounds: int = 20) -> list[float]:
    """The minimum time of each model over interleaved runs (robust to other load on the machine)."""
    sessions = [ort_session(m, level="all", threads=1) for m in models]
    best = [float("inf")] * len(models)
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feeds)
            best[i] = min(best[i], (time.perf_counter() - start) * 1e3)
    return best


def test_demo_prune_25_with_reconstruction_keeps_accuracy_and_is_smaller_and_faster() -> None:
    held = np.load(MODELS / "digits_heldout.npz")
    feeds = {"input": held["input"]}
    base = fuse(DEMO).model
    fp32 = accuracy(predict(base, feeds), held["label"])
    exact = sparsify(DEMO, ratio=0.25, calibration=CALIB).model  # 16/32/64/64/64 -> 12/24/48/48/48
    assert accuracy(predict(exact, feeds), held["label"]) >= fp32 - 1.0
    figures = compare_models(base, exact)
    for key in ("params", "macs", "bytes"):
        assert figures[key]["after"] < 0.6 * figures[key]["before"], key
    # Kept counts rounded to 16 keep onnxruntime's NCHWc (AVX-512) conv layout end to end: 16/32/48/48/48
    aligned = sparsify(DEMO, ratio=0.25, round_to=16, calibration=CALIB).model
    assert accuracy(predict(aligned, feeds), held["label"]) >= fp32 - 1.0
    assert compare_models(base, aligned)["macs"]["after"] < 0.85 * figures["macs"]["before"]
    fp32_ms, aligned_ms = _fastest_ms([base, aligned], {"input": held["input"][:64]})
    assert aligned_ms < fp32_ms


def test_real_cnn_with_residuals_and_depthwise(tmp_path: Path, fused_real_model) -> None:  # noqa: ANN001
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from real_models import make_inputs

    # ppocr_cls fused once per session (conftest), shared with test_real_fuse; the same bytes
    # as fuse(load_model(real_model("ppocr_cls"))).model
    model = load_model(fused_real_model("ppocr_cls")[1])
    x = make_inputs("ppocr_cls", n=4, seed=1)
    report = sparsify(model, ratio=0.25, fuse=False)
    result = report.result("prune_channels")
    reasons = " ".join(r for _, r in result.declined)
    assert "Shape" in reasons  # the classifier head's run-time reshape
    layers = {e["node"]: e for e in result.data["layers"]}
    assert max(len(e["coupled"]) for e in layers.values()) >= 4  # a residual stream pruned in lock-step
    assert result.stats["layers"] >= 30
    figures = compare_models(model, report.model, {"x": [1, 3, 48, 192]})  # the model's own input is [-1, 3, ?, ?]
    assert 0 < figures["macs"]["after"] < 0.75 * figures["macs"]["before"]
    out = run_model(report.model, x)[0]
    assert out.shape == (4, 2) and np.isfinite(out).all()
