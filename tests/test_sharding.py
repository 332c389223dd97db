"""Sharded calibration (worker processes, Ray) and calibration in groups of tensors give the one-process result.

Exactly mergeable statistics (min/max, histograms, ChannelStats) must come out bit for bit equal,
so ``onnxcomp quantize`` writes the same bytes; float sums (ChannelMean) equal up to the order of
the additions. Worker pools are started a few times only: spawning one costs ~2 s on 2 cores.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import api
from onnxcomp.calibration.channels import ChannelStats
from onnxcomp.calibration.collect import Calibrator, collect_many
from onnxcomp.calibration.gram import Fanout
from onnxcomp.calibration.moments import ChannelMean
from onnxcomp.calibration.observers import HistogramObserver, MinMaxObserver
from onnxcomp.calibration.partition import Spool, estimate_bytes, group_tensors
from onnxcomp.calibration.shard import CalibrationResources, calibration_resources, chunk_size
from onnxcomp.cli.main import main
from onnxcomp.errors import CalibrationError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.decoder import DecoderShape, write_decoder  # noqa: E402

DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_calib.npz"
TWO_WORKERS = CalibrationResources(workers=2)


def chain_model() -> onnx.ModelProto:
    """x[N, 3, 8, 8] -> Conv(6) -> Relu -> Conv(4) -> Sigmoid -> Reshape[N, -1] -> MatMul -> y."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 6, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
        numpy_helper.from_array(rng.standard_normal((256, 5)).astype(np.float32), "m"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["s2"], name="sigmoid"),
        helper.make_node("Reshape", ["s2", "flat"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "m"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def batches(n: int, size: int = 4, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {"x": (rng.standard_normal((size, 3, 8, 8)) * (1 + i % 3)).astype(np.float32)}


def state(observer: Any) -> bytes:
    """An observer's whole state as bytes (equal bytes: bit-identical statistics)."""
    return pickle.dumps(observer.__dict__)


RANGES = {"x": HistogramObserver, "c1": HistogramObserver, "r1": MinMaxObserver, "s2": HistogramObserver}


# --- sharded over local worker processes -------------------------------------------------------


def test_workers_merge_every_collector_like_one_process() -> None:
    model = chain_model()
    wanted: dict[str, dict[str, Any]] = {
        "ranges": RANGES,
        "means": {"c1": partial(ChannelMean, 1), "y": partial(ChannelMean, -1)},
        "stats": {"r1": partial(ChannelStats, 1, 16, 0), "f": partial(ChannelStats, -1, 16, 0)},
    }
    data = list(batches(11))  # 11 batches over 2 workers: chunks of 6 and 5
    single = collect_many(model, wanted, data)
    with calibration_resources(TWO_WORKERS) as notes:
        sharded = collect_many(model, wanted, data)
    assert notes == ["calibration sharded over 2 worker processes"]
    for tensor in RANGES:
        assert state(sharded["ranges"][tensor]) == state(single["ranges"][tensor])
    for tensor in ("r1", "f"):  # exact integer sums, absmax and the hash-keyed row reservoir
        a, b = single["stats"][tensor], sharded["stats"][tensor]
        assert a.count == b.count == (11 * 4 * 64 if tensor == "r1" else 11 * 4)
        np.testing.assert_array_equal(a.mean_abs(), b.mean_abs())
        np.testing.assert_array_equal(a.amax(), b.amax())
        np.testing.assert_array_equal(a.rows(), b.rows())
    for tensor in ("c1", "y"):  # float64 sums: the same up to the order of the additions
        a, b = single["means"][tensor], sharded["means"][tensor]
        assert a.count == b.count
        np.testing.assert_allclose(b.mean(), a.mean(), rtol=1e-12, atol=1e-12)
    # and both against a brute-force reference over every value
    everything = np.concatenate([b["x"] for b in data])
    x = single["ranges"]["x"]
    assert (x.min_val, x.max_val, x.numel) == (float(everything.min()), float(everything.max()), everything.size)


def test_worker_errors_name_the_batch_and_tensor() -> None:
    data = list(batches(6))
    data[4]["x"][0, 0, 0, 0] = np.nan
    with calibration_resources(TWO_WORKERS), pytest.raises(CalibrationError, match=r"calibration batch 4: tensor 'x'"):
        Calibrator(chain_model(), {"x": MinMaxObserver, "c1": MinMaxObserver}).run(data)


class DiesInWorker(MinMaxObserver):
    """An observer whose process dies on the first update (a worker killed by the OOM killer)."""

    def update(self, x: np.ndarray) -> None:
        os._exit(3)


def test_a_dead_worker_or_an_unloadable_model_is_a_one_line_error() -> None:
    with calibration_resources(TWO_WORKERS), pytest.raises(CalibrationError, match="a calibration worker process died"):
        Calibrator(chain_model(), {"c1": DiesInWorker}).run(batches(4))
    model = chain_model()
    model.graph.node[1].op_type, model.graph.node[1].domain = "Gelu", "com.example"  # no kernel anywhere
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with (
        calibration_resources(TWO_WORKERS),
        pytest.raises(CalibrationError, match="^onnxruntime cannot load the calibration model: "),
    ):
        Calibrator(model, {"c1": MinMaxObserver}).run(batches(4))


def test_collectors_that_cannot_merge_stay_in_process() -> None:
    """A fan-out into accumulators that cannot make empty copies of themselves (no ``blank``) stays here.

    (InputGram and the channel-pruning Gram do: tests/test_sharding_stats.py.)"""
    kept = [MinMaxObserver()]
    with calibration_resources(TWO_WORKERS) as notes:
        Calibrator(chain_model(), {"c1": lambda: Fanout(kept)}).run(batches(3))
    assert kept[0].numel == 3 * 4 * 6 * 64  # filled here, in this process
    assert len(notes) == 1 and "'c1' (Fanout) cannot merge partial results" in notes[0]


def test_bad_resources_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="workers must be a positive integer"):
        CalibrationResources(workers=0)
    with pytest.raises(ConfigError, match="ray must be a cluster address"):
        CalibrationResources(ray=" ")
    with pytest.raises(ConfigError, match="calib_memory must be a positive number of GB"):
        api.compress(DIGITS, [], calibration=DIGITS_CALIB, calib_memory=-1)


def test_ray_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with (
        calibration_resources(CalibrationResources(ray="auto")),
        pytest.raises(CalibrationError, match=r"--ray needs Ray, which is not installed; install it with: pip install"),
    ):
        Calibrator(chain_model(), {"c1": MinMaxObserver}).run(batches(2))


def test_chunks_depend_only_on_batches_and_workers() -> None:
    assert [chunk_size(n, 2) for n in (1, 2, 3, 11, 100)] == [1, 1, 2, 6, 8]
    assert chunk_size(None, 4) == 4


def quantize_cli(out: Path, *extra: str) -> bytes:
    args = ["quantize", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB), "--batch-size", "16"]
    assert main([*args, "--quiet", "--no-report", *extra]) == 0
    return out.read_bytes()


@pytest.mark.parametrize("observer", ["minmax", "histogram"])
def test_quantize_with_workers_writes_the_same_bytes(tmp_path: Path, observer: str) -> None:
    source = DIGITS.read_bytes()
    single = quantize_cli(tmp_path / "single.onnx", "--observer", observer)
    sharded = quantize_cli(tmp_path / "sharded.onnx", "--observer", observer, "--workers", "2")
    assert sharded == single
    assert DIGITS.read_bytes() == source  # the input is never modified
    recipe = (tmp_path / "sharded.recipe.toml").read_text()
    assert "calibration sharded over 2 worker processes" in recipe


# --- sharded over a local Ray cluster ------------------------------------------------------------


def test_ray_cluster_gives_the_same_bytes(tmp_path: Path, ray_cluster: Any) -> None:
    for observer in ("minmax", "histogram"):
        single = quantize_cli(tmp_path / f"{observer}.onnx", "--observer", observer)
        on_ray = quantize_cli(tmp_path / f"{observer}.ray.onnx", "--observer", observer, "--ray", "auto")
        assert on_ray == single, observer
    data = list(batches(5))
    data[3]["x"][0, 0, 0, 0] = np.inf
    with (
        calibration_resources(CalibrationResources(ray="auto")),
        pytest.raises(CalibrationError, match=r"calibration batch 3: tensor 'x'"),
    ):
        Calibrator(chain_model(), {"x": MinMaxObserver, "c1": MinMaxObserver}).run(data)


# --- calibration in groups of tensors -----------------------------------------------------------


def test_estimated_sizes_match_what_onnxruntime_returns() -> None:
    model = chain_model()
    names = ["c1", "r1", "c2", "s2", "f", "y"]
    batch = next(batches(1, size=5))
    sizes = estimate_bytes(model, names, batch)
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    augmented.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names[:-1])
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    actual = dict(zip(names[:-1] + ["y"], session.run(names[:-1] + ["y"], batch), strict=True))
    assert sizes == {n: actual[n].nbytes for n in names}


def test_groups_stay_within_the_budget() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        names = [f"t{i}" for i in range(int(rng.integers(1, 12)))]
        sizes: dict[str, int | None] = {n: None if rng.random() < 0.2 else int(rng.integers(1, 100)) for n in names}
        budget = int(rng.integers(1, 300))
        groups = group_tensors(names, sizes, budget)
        assert [n for g in groups for n in g] == names  # every tensor once, in order
        largest = max([s for s in sizes.values() if s is not None], default=budget)
        cost = {n: largest if s is None else s for n, s in sizes.items()}
        for group in groups:
            assert len(group) == 1 or sum(cost[n] for n in group) <= budget
        for a, b in zip(groups, groups[1:]):  # greedy: the next tensor would not have fitted
            assert sum(cost[n] for n in a) + cost[b[0]] > budget


@pytest.mark.parametrize("one_shot", [False, True])
def test_calibration_in_groups_equals_all_at_once(one_shot: bool) -> None:
    model = chain_model()
    factories = {**RANGES, "c2": HistogramObserver, "f": MinMaxObserver, "y": HistogramObserver}
    whole = Calibrator(model, factories).run(batches(7))
    per_batch = 4 * 6 * 64 * 4  # one (4, 6, 8, 8) float32 tensor
    calibrator = Calibrator(model, factories)
    data = batches(7) if one_shot else list(batches(7))  # a generator is spooled to disk and replayed
    grouped = calibrator.run(data, resources=CalibrationResources(memory=per_batch + 1))
    assert calibrator.batches_seen == 7
    assert len(calibrator.notes) == 1 and "calibrated in 5 groups" in calibrator.notes[0]
    for name in factories:
        assert state(grouped[name]) == state(whole[name]), name


def test_unknown_sizes_expose_everything_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("onnxcomp.calibration.collect.estimate_bytes", lambda model, names, batch: dict.fromkeys(names))
    calibrator = Calibrator(chain_model(), dict(RANGES))
    calibrator.run(batches(2), resources=CalibrationResources(memory=1))
    assert calibrator.notes == ["no tensor size could be inferred: every tensor exposed at once, whatever the budget"]


def test_spool_replays_the_stream() -> None:
    spool = Spool(batches(3))
    try:
        first = list(spool.record())
        again = list(spool.replay())
    finally:
        spool.close()
    assert len(again) == 3
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])


def test_quantize_in_groups_and_workers_writes_the_same_bytes(tmp_path: Path) -> None:
    single = quantize_cli(tmp_path / "single.onnx")
    grouped = quantize_cli(tmp_path / "grouped.onnx", "--calib-memory", "0.0006", "--workers", "2")
    assert grouped == single
    recipe = (tmp_path / "grouped.recipe.toml").read_text()
    assert "groups, one pass over the data each" in recipe


# --- an LLM-shaped decoder with external data (models/decoder.py) --------------------------------


def decoder_reference(model: onnx.ModelProto, ids: np.ndarray, shape: DecoderShape) -> np.ndarray:
    """The decoder in numpy, from the model's own weights: a brute-force check of the graph."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    heads, hd = shape.heads, shape.hidden // shape.heads

    def rms(x: np.ndarray, g: str) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w[g]

    def split(t: np.ndarray) -> np.ndarray:
        return t.reshape(*t.shape[:2], heads, hd).transpose(0, 2, 1, 3)

    x = w["embed_tokens.weight"][ids]
    s = ids.shape[1]
    mask = np.triu(np.full((s, s), -1e9), k=1)
    for layer in range(shape.layers):
        p = f"layers.{layer}"
        a = rms(x, f"{p}.input_norm.weight")
        q, k, v = (split(a @ w[f"{p}.self_attn.{n}_proj.weight"]) for n in "qkv")
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + context @ w[f"{p}.self_attn.o_proj.weight"]
        m = rms(x, f"{p}.post_attention_norm.weight")
        gate, up = m @ w[f"{p}.mlp.gate_proj.weight"], m @ w[f"{p}.mlp.up_proj.weight"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f"{p}.mlp.down_proj.weight"]
    return rms(x, "norm.weight") @ w["lm_head.weight"]


def test_decoder_generator_quantizes_with_workers(tmp_path: Path) -> None:
    shape = DecoderShape(layers=2, hidden=64, heads=4, ffn=96, vocab=128)
    path = tmp_path / "decoder.onnx"
    write_decoder(path, shape, seed=3)
    data = path.with_name("decoder.onnx.data")
    assert data.stat().st_size >= shape.parameters() * 4 and path.stat().st_size < 20_000  # weights external
    again = tmp_path / "again.onnx"
    write_decoder(again, shape, seed=3)
    assert again.with_name("again.onnx.data").read_bytes() == data.read_bytes()  # seeded: byte-identical
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ids = np.random.default_rng(0).integers(0, shape.vocab, (3, 9))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": ids})
    np.testing.assert_allclose(logits, decoder_reference(model, ids, shape), rtol=1e-4, atol=1e-4)

    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(1).integers(0, shape.vocab, (24, 9)))
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w8a8.{workers}.onnx"
        api.quantize(path, out, calibration=calib, batch_size=4, workers=workers, observer="minmax", reports=False)
        outputs[workers] = out.read_bytes()
    assert outputs[2] == outputs[1]
    ops = [n.op_type for n in onnx.load_from_string(outputs[1]).graph.node]
    assert ops.count("QuantizeLinear") >= 8  # static activations of the projections were calibrated
    (quantized,) = ort.InferenceSession(outputs[1], providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    cos = float(np.dot(quantized.ravel(), logits.ravel()) / np.linalg.norm(quantized) / np.linalg.norm(logits))
    assert cos > 0.99
