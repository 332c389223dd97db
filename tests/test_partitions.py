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

from onnxcomp.calibration.collect import Calibrator
from onnxcomp.calibration.observers import HistogramObserver, MinMaxObserver
from onnxcomp.calibration.shard import CalibrationResources
from onnxcomp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.decoder import DecoderShape, write_decoder  # noqa: E402

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
