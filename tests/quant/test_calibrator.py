"""Streaming calibrator: exact statistics, constant memory, one-line errors."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator
from functools import partial

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.calibration.collect import Calibrator
from onnxcomp.calibration.observers import (
    OBSERVER_POLICIES,
    HistogramObserver,
    MinMaxObserver,
    compute_range,
    make_observer,
)
from onnxcomp.errors import CalibrationError, ConfigError

SHAPE = (4, 3, 12, 12)


def conv_relu_matmul() -> onnx.ModelProto:
    """x[N,3,12,12] -> Conv(4, 3x3) -> Relu -> MatMul([12,5]) -> y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((12, 5)).astype(np.float32), "m"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "m"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "crm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 12, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def batches(n: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Lazily made batches: the data never exists all at once."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {"x": (rng.standard_normal(SHAPE) * (1 + i % 3)).astype(np.float32), "label": np.int64(i)}


def reference_outputs(model: onnx.ModelProto, names: list[str], n: int) -> dict[str, np.ndarray]:
    """Every batch's value of each tensor, by a separate ORT session (all concatenated)."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    ref.graph.ClearField("output")
    ref.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n != "x")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(ref.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in batches(n):
        values = dict(zip([o.name for o in ref.graph.output], sess.run(None, {"x": batch["x"]}), strict=True))
        values["x"] = batch["x"]
        for name in names:
            collected[name].append(values[name].ravel())
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def test_exact_statistics_match_reference() -> None:
    model = conv_relu_matmul()
    names = ["x", "c", "r", "y"]
    factories = {"x": MinMaxObserver, "c": MinMaxObserver, "r": HistogramObserver, "y": lambda: HistogramObserver(512)}
    cal = Calibrator(model, factories)
    observers = cal.run(batches(7))
    assert cal.batches_seen == 7 and set(observers) == set(names)
    ref = reference_outputs(model, names, 7)
    for name in names:
        obs = observers[name]
        assert (obs.min_val, obs.max_val, obs.numel) == (float(ref[name].min()), float(ref[name].max()), ref[name].size)
    for name in ("r", "y"):  # histograms equal one observer fed everything at once
        single = HistogramObserver(observers[name].num_bins)
        single.update(ref[name])
        assert np.array_equal(observers[name].counts, single.counts) and observers[name].k == single.k
    assert observers["r"].min_val == 0.0 and observers["r"].zeros > 0
    # the caller's model is untouched (outputs were added to a copy)
    assert [o.name for o in model.graph.output] == ["y"]


def test_streamed_float32_histograms_equal_float64_binning() -> None:
    """Calibrator batches go through the float32 binning path; one float64 pass over all the
    reference values (the generic path) gives the same state, hence the same range per policy."""
    from onnxcomp.quant.qparams import range_qdq

    model = conv_relu_matmul()
    names = ["x", "c", "r", "y"]
    ref = reference_outputs(model, names, 9)
    for num_bins in (64, 2048):
        factory = partial(HistogramObserver, num_bins)
        observers = Calibrator(model, dict.fromkeys(names, factory)).run(batches(9))
        for name in names:
            streamed, single = observers[name], HistogramObserver(num_bins)
            single.update(ref[name].astype(np.float64))
            assert np.array_equal(streamed.counts, single.counts)
            assert (streamed.k, streamed.zeros, streamed.numel) == (single.k, single.zeros, single.numel)
            for policy in OBSERVER_POLICIES[1:]:
                for symmetric in (False, True):
                    qdq = range_qdq("int8" if symmetric else "uint8", symmetric)
                    assert compute_range(policy, streamed, qdq, symmetric) == compute_range(
                        policy, single, qdq, symmetric
                    )


def test_max_batches_progress_and_fresh_observers(capsys: pytest.CaptureFixture[str]) -> None:
    cal = Calibrator(conv_relu_matmul(), {"r": MinMaxObserver})
    stream = batches(20)
    first = cal.run(stream, max_batches=5, progress=True)
    assert cal.batches_seen == 5
    assert next(stream)["label"] == 5  # islice: no batch consumed beyond the limit
    second = cal.run(list(batches(3)))
    assert cal.batches_seen == 3 and second["r"] is not first["r"] and second["r"].numel == 3 * 4 * 4 * 12 * 12
    with pytest.raises(ConfigError, match="max_batches"):
        cal.run(batches(2), max_batches=0)


def test_memory_does_not_grow_with_batches() -> None:
    model = conv_relu_matmul()
    factories = {name: (lambda: make_observer("percentile")) for name in ("x", "c", "r", "y")}
    cal = Calibrator(model, factories)
    cal.run(batches(3))  # warm up (ORT allocations, tqdm/numpy caches)

    def measure(n: int) -> tuple[int, int]:
        gc.collect()
        tracemalloc.start()
        try:
            observers = cal.run(batches(n))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak, sum(o.state_nbytes() for o in observers.values())

    peak10, state10 = measure(10)
    peak100, state100 = measure(100)
    print(f"state bytes: {state10} vs {state100}; tracemalloc peak: {peak10} vs {peak100}")
    assert state10 == state100
    assert peak100 < 1.5 * peak10


def test_unknown_and_constant_tensor_names() -> None:
    model = conv_relu_matmul()
    with pytest.raises(CalibrationError, match="tensor 'rr' is not a graph input or a node output.*did you mean 'r'"):
        Calibrator(model, {"c": MinMaxObserver, "rr": MinMaxObserver})
    with pytest.raises(CalibrationError, match="tensor 'w' is an initializer"):
        Calibrator(model, {"w": MinMaxObserver})


def test_empty_data_and_bad_batches() -> None:
    cal = Calibrator(conv_relu_matmul(), {"c": MinMaxObserver, "x": MinMaxObserver})
    with pytest.raises(CalibrationError, match="^calibration data is empty$"):
        cal.run([])
    with pytest.raises(CalibrationError, match="batch 0: missing model input\\(s\\) x"):
        cal.run([{"z": np.zeros(SHAPE, np.float32)}])
    with pytest.raises(CalibrationError, match="batch 1: onnxruntime failed"):
        cal.run([{"x": np.zeros(SHAPE, np.float32)}, {"x": np.zeros((4, 3, 12), np.float32)}])
    with pytest.raises(CalibrationError, match="batch 0: tensor 'x': non-finite"):
        cal.run([{"x": np.full(SHAPE, np.nan, np.float32)}])


def test_non_finite_intermediate_names_tensor_and_batch() -> None:
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["l"]), helper.make_node("Abs", ["l"], ["a"])],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": np.float32([1, 2, 3, 4])}] * 2 + [{"x": np.float32([1, 0, 3, 4])}]  # log(0) = -inf
    cal = Calibrator(model, {"l": HistogramObserver, "a": MinMaxObserver})
    with pytest.raises(CalibrationError, match="calibration batch 2: tensor 'l': non-finite values"):
        cal.run(data)
    cal = Calibrator(model, {"x": MinMaxObserver})  # inputs only: no session run needed
    assert cal.run(data)["x"].min_val == 0.0 and cal.batches_seen == 3
