"""``onnxcomp qat``: trains, exports the best epoch, is deterministic, resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS

from onnxcomp.api import compress
from onnxcomp.cli.main import main
from onnxcomp.flags import FUSE_PIPELINE
from onnxcomp.runtime import ort_session

pytest.importorskip("torch", reason="the train extra (torch) is not installed: pip install 'onnxcomp[train]'")

DEMO = str(MODELS / "digits_cnn.onnx")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    held = np.load(MODELS / "digits_heldout.npz")
    path = tmp_path_factory.mktemp("data") / "train.npz"
    np.savez(path, input=held["input"][:96], label=held["label"][:96])
    return path


def _run(out: Path, data: Path, *extra: str) -> int:
    flags = ["--epochs", "1", "--lr", "1e-3", "--batch-size", "32", "--weights", "int4", "--activations", "uint4"]
    return main(["-q", "qat", DEMO, "-o", str(out), "--data", str(data), *flags, *extra])


def test_labels_training_is_deterministic_and_records_history(tmp_path: Path, labelled: Path) -> None:
    assert _run(tmp_path / "a.onnx", labelled, "--labels", "label") == 0
    assert _run(tmp_path / "b.onnx", labelled, "--labels", "label") == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    history = json.loads((tmp_path / "a.qat_record.json").read_text())
    assert history["metric"] == "accuracy" and len(history["history"]) == 2  # the PTQ start, then epoch 1
    record = json.loads((tmp_path / "a.quant_record.json").read_text())
    assert record[0]["weights"]["dtype"] == "int4" and record[0]["trained"]
    x = np.load(MODELS / "digits_heldout.npz")["input"][96:160]
    assert np.isfinite(ort_session(tmp_path / "a.onnx").run(None, {"input": x})[0]).all()


def test_resume_continues_to_the_same_model(tmp_path: Path, labelled: Path) -> None:
    """One epoch, then --resume to two, gives the bytes of two epochs in one run (distillation)."""
    assert _run(tmp_path / "straight.onnx", labelled, "--epochs", "2") == 0
    assert _run(tmp_path / "resumed.onnx", labelled) == 0
    assert _run(tmp_path / "resumed.onnx", labelled, "--epochs", "2", "--resume") == 0
    assert (tmp_path / "straight.onnx").read_bytes() == (tmp_path / "resumed.onnx").read_bytes()
    history = json.loads((tmp_path / "resumed.qat_record.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [0, 1, 2]  # 0: the PTQ start


def test_bad_labels_name_is_one_line(tmp_path: Path, labelled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path / "x.onnx", labelled, "--labels", "target") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no labels array 'target'; arrays: input, label" in err[0]


def test_recipe_pass_equals_the_command(tmp_path: Path, labelled: Path) -> None:
    """A recipe naming the pass by module:Class writes the model `onnxcomp qat` writes (same seed)."""
    recipe = tmp_path / "qat.toml"
    recipe.write_text(
        "\n".join(
            [
                *(f'[[passes]]\npass = "{name}"\n' for name in FUSE_PIPELINE),
                "[[passes]]",
                'pass = "onnxcomp.qat.qat_pass:QuantizationAwareTraining"',
                f'data = "{labelled}"',
                'labels = "label"',
                "epochs = 1",
                "lr = 1e-3",
                'weights = "int4"',
                'activations = "uint4"',
                "",
            ]
        )
    )
    report = compress(DEMO, recipe, tmp_path / "recipe.onnx")
    assert report.result("qat").stats["epochs"] == 1
    assert _run(tmp_path / "cli.onnx", labelled, "--labels", "label") == 0
    ref = ort_session(tmp_path / "cli.onnx").run(None, {"input": np.load(labelled)["input"][:32]})[0]
    got = ort_session(tmp_path / "recipe.onnx").run(None, {"input": np.load(labelled)["input"][:32]})[0]
    np.testing.assert_array_equal(got, ref)
