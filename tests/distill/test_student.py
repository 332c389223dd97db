"""The student's inputs are what the deployed model computes (activation quantizers included), and learned ranges deploy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp import compress
from onnxcomp.flags import quantize_options, with_fusions
from onnxcomp.framework.registry import make_pass
from onnxcomp.quant.distill import driver
from onnxcomp.quant.emit import activation_qparams
from onnxcomp.runtime import TensorRunner

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO = MODELS / "digits_cnn.onnx"


def test_every_block_input_is_the_deployed_models_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block k learns on the tensor the deployed W4A8 model computes there (earlier blocks' learned
    weights, biases, learned ranges and every activation quantizer), to float rounding."""
    calib = {"input": np.load(MODELS / "digits_calib.npz")["input"][:16]}
    seen: dict[str, np.ndarray] = {}
    collect = driver._collect

    def spy(model, names, batches, limit, stash):  # noqa: ANN001, ANN202
        got = collect(model, names, batches, limit, stash)
        if len(names) == 1:  # the student's block input (the teacher's run asks for every block end at once)
            seen[names[0]] = np.array(got[names[0]])
        return got

    monkeypatch.setattr(driver, "_collect", spy)
    out = tmp_path / "d.onnx"
    options = {**quantize_options(weights="int4", activations="uint8", placement="all", reports=False)}
    options.update(iters=40, batch_rows=256, learn_ranges=True)  # the pass options (what onnxcomp.distill builds)
    report = compress(DEMO, with_fusions([make_pass("distill", options)]), out, calibration=calib, batch_size=8)
    assert len(seen) >= 5
    deployed = onnx.load(str(out))
    runner = TensorRunner(deployed, sorted(seen), truncate=True)
    values: dict[str, list[np.ndarray]] = {n: [] for n in seen}
    for i in range(0, 16, 8):
        for name, value in runner.run({"input": calib["input"][i : i + 8]}, i).items():
            values[name].append(value)
    record = report.result("distill").data["record"]
    steps = {a["tensor"]: a["scale"] for e in record for a in e.get("outputs", []) + e.get("activations", [])}
    for name, student in seen.items():
        expected = np.concatenate(values[name])
        step = steps.get(name, 1e-3)
        diff = np.abs(student - expected)
        # equal but for a code flipped at a rounding tie (int32 bias vs float bias): at most one step, rarely
        assert diff.max() <= step * 1.01, (name, diff.max(), step)
        assert np.mean(diff > 1e-5 * max(1.0, float(np.abs(expected).max()))) < 1e-3, name
    learned = [e["distill"]["input_range"] for e in record if "input_range" in e.get("distill", {})]
    assert learned, "no block learned its input range"
    by_tensor = {a["tensor"]: a for e in record for a in e.get("activations", [])}
    for r in learned:
        emitted = by_tensor[r["tensor"]]
        assert emitted["range"] == pytest.approx(r["learned"]) and r["learned"] != pytest.approx(r["calibrated"])
        scale, _ = activation_qparams("uint8", *r["learned"], False)
        assert emitted["scale"] == pytest.approx(float(scale), rel=1e-6)


def test_same_seed_identical_bytes_with_every_learnable(tmp_path: Path) -> None:
    """W4A8 with learned ranges and balanced channels: the same seed writes the same bytes, another seed does not."""
    from onnxcomp.framework.recipe import Recipe

    calib = {"input": np.load(MODELS / "digits_calib.npz")["input"][:16]}
    options = {**quantize_options(weights="int4", activations="uint8", placement="all", reports=False)}
    options.update(iters=30, batch_rows=256, learn_ranges=True, balance_channels=True)
    paths = [tmp_path / f"{i}.onnx" for i in range(3)]
    for path, seed in zip(paths, (4, 4, 5), strict=True):
        recipe = Recipe(with_fusions([make_pass("distill", options)]), seed=seed, validate="locate")
        compress(DEMO, recipe, path, calibration=calib, batch_size=8)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
