"""Calibration running the graph in partitions (calibration.blocks) equals the all-at-once run.

Each partition's session is fed the earlier partitions' outputs; every observer must end with
the bytes of the one-session run (histogram and min/max observers), on an LLM-shaped decoder
(causal mask built once and read by every layer: a boundary tensor that crosses several cuts).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from onnxcomp import api
from onnxcomp.calibration.collect import Calibrator
from onnxcomp.calibration.observers import HistogramObserver, MinMaxObserver
from onnxcomp.calibration.shard import CalibrationResources
from onnxcomp.cli.main import main
from onnxcomp.errors import CalibrationError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.decoder import DecoderShape, write_decoder  # noqa: E402

DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_calib.npz"
SHAPE = DecoderShape(layers=3, hidden=64, heads=4, ffn=128, vocab=256)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("partitions") / "decoder.onnx"
    write_decoder(path, SHAPE, seed=4)
    return onnx.load(str(path))


def _batches() -> list[dict[str, np.ndarray]]:
    return [{"input_ids": np.random.default_rng(i).integers(0, SHAPE.vocab, (2, 12))} for i in range(4)]


def _state(observer: Any) -> bytes:
    return pickle.dumps(observer.__dict__)


def _factories(model: onnx.ModelProto) -> dict[str, Any]:
    """Every MatMul's activation input (histogram) and output (min/max), the causal mask, the logits."""
    factories: dict[str, Any] = {"causal_mask": MinMaxObserver, "logits": HistogramObserver}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            factories[node.input[0]] = HistogramObserver
            factories[node.output[0]] = MinMaxObserver
    return factories


@pytest.mark.parametrize("parts", [2, 5, 40])
def test_partitioned_calibration_equals_all_at_once(decoder: onnx.ModelProto, parts: int) -> None:
    factories = _factories(decoder)
    whole = Calibrator(decoder, factories).run(_batches())
    calibrator = Calibrator(decoder, factories)
    split = calibrator.run(_batches(), resources=CalibrationResources(partitions=parts))
    assert calibrator.notes == [f"the graph ran in {parts} partitions, one session each"]
    assert calibrator.batches_seen == 4
    for name in factories:
        assert _state(split[name]) == _state(whole[name]), name


def test_partitions_compose_with_tensor_groups(decoder: onnx.ModelProto) -> None:
    factories = _factories(decoder)
    whole = Calibrator(decoder, factories).run(_batches())
    calibrator = Calibrator(decoder, factories)
    split = calibrator.run(_batches(), resources=CalibrationResources(partitions=3, memory=20_000))
    assert any("groups" in note for note in calibrator.notes)
    for name in factories:
        assert _state(split[name]) == _state(whole[name]), name


def test_a_graph_that_cannot_be_partitioned_runs_all_at_once(decoder: onnx.ModelProto) -> None:
    factories = {"logits": MinMaxObserver}
    calibrator = Calibrator(decoder, factories)
    calibrator.run(_batches(), resources=CalibrationResources(partitions=10_000))
    assert calibrator.notes == [
        f"the graph ran all at once, not in 10000 partitions: {len(decoder.graph.node)} nodes cannot make 10000 partitions"
    ]
    with pytest.raises(ConfigError, match="partitions must be a positive integer, got 0"):
        CalibrationResources(partitions=0)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([1, 2], "calibration batch 1: expected a mapping of input name to array, got list"),
        ({"other": np.zeros(2)}, "calibration batch 1: missing model input(s) input_ids (batch has other)"),
    ],
)
@pytest.mark.parametrize("parts", [1, 3])
def test_a_bad_batch_gets_the_same_error_all_at_once_and_in_partitions(
    decoder: onnx.ModelProto, parts: int, batch: Any, message: str
) -> None:
    batches = [_batches()[0], batch]
    calibrator = Calibrator(decoder, {"logits": MinMaxObserver})
    with pytest.raises(CalibrationError) as caught:
        calibrator.run(batches, resources=CalibrationResources(partitions=parts))
    assert str(caught.value) == message


# --- the front ends: --calib-partitions / calib_partitions= ----------------------------------------


def _quantize_cli(out: Path, *extra: str) -> bytes:
    args = ["quantize", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB), "--batch-size", "16"]
    assert main([*args, "--quiet", "--no-report", *extra]) == 0
    return out.read_bytes()


def test_quantize_with_calib_partitions_writes_the_same_bytes(tmp_path: Path) -> None:
    source = DIGITS.read_bytes()
    single = _quantize_cli(tmp_path / "single.onnx")
    split = _quantize_cli(tmp_path / "split.onnx", "--calib-partitions", "3")
    assert split == single
    assert DIGITS.read_bytes() == source  # the input is never modified
    assert "the graph ran in 3 partitions, one session each" in (tmp_path / "split.recipe.toml").read_text()
    assert "partitions" not in (tmp_path / "single.recipe.toml").read_text()


def test_api_calib_partitions_writes_the_same_bytes(tmp_path: Path) -> None:
    single = _quantize_cli(tmp_path / "single.onnx")
    report = api.quantize(
        DIGITS, tmp_path / "api.onnx", calibration=DIGITS_CALIB, batch_size=16, calib_partitions=3, reports=False
    )
    assert (tmp_path / "api.onnx").read_bytes() == single
    assert report.notes == ["the graph ran in 3 partitions, one session each"]


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "three"])
def test_bad_calib_partitions_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    args = ["quantize", str(DIGITS), "-o", str(tmp_path / "q.onnx"), "--calib", str(DIGITS_CALIB)]
    with pytest.raises(SystemExit) as exited:
        main([*args, "--calib-partitions", value])
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        f"onnxcomp quantize: error: argument --calib-partitions: expected a positive integer, got {value!r}"
    ]
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "3"])
def test_bad_calib_partitions_keyword_is_a_config_error(value: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"^calib_partitions must be a positive integer \(1: the whole graph at once\), got "
    ):
        api.compress(DIGITS, [], calibration=DIGITS_CALIB, calib_partitions=value)
