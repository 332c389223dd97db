"""Measuring a model: task accuracy, output agreement with a reference, onnxruntime latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import numpy as np
import onnx

from onnxcomp.runtime import ort_session


def predict(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    batch: int = 256,
    level: str = "all",
    output: str | None = None,
    threads: int = 1,
) -> np.ndarray:
    """One output (the first, or ``output``) of ``model`` over ``feeds`` (first axis = samples), in batches."""
    session = ort_session(model, level=level, threads=threads)
    names = [output] if output is not None else None
    n = len(next(iter(feeds.values())))
    outs = []
    for start in range(0, n, batch):
        outs.append(session.run(names, {k: v[start : start + batch] for k, v in feeds.items()})[0])
    return np.concatenate(outs)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(axis=-1) == labels).mean() * 100.0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened outputs."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denom) if denom else float(np.array_equal(a64, b64))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - test.astype(np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal else float("-inf")


def latency_ms(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], threads: int = 1, runs: int = 50, warmup: int = 5
) -> float:
    """Median wall time of one ``session.run`` in milliseconds (ORT_ENABLE_ALL)."""
    session = ort_session(model, level="all", threads=threads)
    feeds = dict(feeds)
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
