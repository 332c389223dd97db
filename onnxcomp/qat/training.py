"""Our training loop: distillation from the float model (label-free, default) or labels.

Deterministic on CPU for one seed: the split, the batch order and the initial state come from it,
and torch runs with deterministic algorithms. Each epoch ends with a held-out metric; the best
epoch's state is kept, and a checkpoint (model, optimizer, epoch) is written for ``resume``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from onnxcomp.errors import CalibrationError
from onnxcomp.qat.engine import torch
from onnxcomp.qat.prepared import QATModule
from onnxcomp.runtime import ort_session

F = torch.nn.functional


@dataclass
class TrainReport:
    """Per-epoch loss and held-out metric, which epoch was kept, and what the metric is."""

    metric: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = float("-inf")


def load_training_data(
    path: str | Path, inputs: list[str], labels: str | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays named by model input (samples along axis 0) from an .npz or a directory of .npz files."""
    path = Path(path)
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise CalibrationError(f"{path}: no training data (.npz, or a directory of .npz files)")
    parts: dict[str, list[np.ndarray]] = {}
    for f in files:
        with np.load(f) as data:
            for key in data.files:
                parts.setdefault(key, []).append(data[key])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    missing = [n for n in inputs if n not in arrays]
    if missing:
        raise CalibrationError(f"{path}: no array for model input(s) {', '.join(missing)}; name arrays by input")
    if labels is not None and labels not in arrays:
        raise CalibrationError(f"{path}: no labels array {labels!r}; arrays: {', '.join(sorted(arrays))}")
    sizes = {len(arrays[n]) for n in [*inputs, *([labels] if labels else [])]}
    if len(sizes) != 1:
        raise CalibrationError(f"{path}: inputs and labels hold different numbers of samples ({sorted(sizes)})")
    return {n: arrays[n] for n in inputs}, (arrays[labels] if labels is not None else None)


def _batches(n: int, size: int, rng: np.random.Generator, shuffle: bool) -> list[np.ndarray]:
    order = rng.permutation(n) if shuffle else np.arange(n)
    return [order[i : i + size] for i in range(0, n, size)]


def _teacher(model: onnx.ModelProto, data: dict[str, np.ndarray], names: list[str], size: int) -> list[np.ndarray]:
    session = ort_session(model)
    outs: list[list[np.ndarray]] = [[] for _ in names]
    n = len(next(iter(data.values())))
    for i in range(0, n, size):
        got = session.run(names, {k: v[i : i + size] for k, v in data.items()})
        for bucket, value in zip(outs, got, strict=True):
            bucket.append(value)
    return [np.concatenate(b) for b in outs]


def _loss(outputs: list[torch.Tensor], targets: list[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
    if labels is not None:
        y = outputs[0]
        if not labels.is_floating_point() and y.dim() == 2:
            return F.cross_entropy(y, labels)
        return F.mse_loss(y, labels.to(y.dtype).reshape(y.shape))
    # distillation: each float output's squared error, relative to the teacher's energy
    return sum(F.mse_loss(y, t) / t.pow(2).mean().clamp_min(1e-12) for y, t in zip(outputs, targets, strict=True))  # type: ignore[return-value]


def _metric(outputs: list[np.ndarray], targets: list[np.ndarray], labels: np.ndarray | None) -> float:
    """Higher is better: accuracy against integer labels, else minus the relative squared error."""
    y = outputs[0]
    if labels is not None and labels.dtype.kind in "iu" and y.ndim == 2:
        return float(np.mean(y.argmax(1) == labels))
    if labels is not None:
        return -float(np.mean((y - labels.reshape(y.shape)) ** 2))
    return -sum(float(np.mean((o - t) ** 2) / max(np.mean(t**2), 1e-12)) for o, t in zip(outputs, targets, strict=True))


def fit(
    module: QATModule,
    data: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    teacher: onnx.ModelProto | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 32,
    heldout: float = 0.1,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    threads: int = 1,
) -> TrainReport:
    """Train ``module`` in place on ``data`` ({input: samples on axis 0}); keeps the best held-out epoch.

    ``threads``: torch's intra-op threads. One by default: the graphs are small per op, and on a
    busy CPU torch's thread pool spins (a 40 ms step took 1.8 s with 2 threads under load).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    names = [n for n in module.output_names]
    n = len(next(iter(data.values())))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    cut = max(1, int(round(n * heldout))) if n > 1 and heldout > 0 else 0
    held, train = order[:cut], order[cut:]
    targets = _teacher(teacher or module.float_model, dict(data), names, 256) if labels is None else []
    float_outputs = [i for i, t in enumerate(targets) if t.dtype.kind == "f"] if labels is None else [0]
    if labels is None:
        what = "-distillation error"
    else:
        what = "accuracy" if labels.dtype.kind in "iu" else "-squared error"
    report = TrainReport(what)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    start = 0
    best_state = copy.deepcopy(module.state_dict())
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        saved = torch.load(checkpoint, weights_only=False)
        module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start, report = saved["epoch"] + 1, saved["report"]
        best_state = saved["best"]
        rng = np.random.default_rng([seed, start])

    def feeds(index: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v[index])) for k, v in data.items()}

    def evaluate() -> float:
        if not len(held):
            return float("nan")
        with torch.no_grad():
            out = module(feeds(held))
        ys = [out[names[i]].numpy() for i in float_outputs]
        refs = [targets[i][held] for i in float_outputs] if labels is None else []
        return _metric(ys, refs, labels[held] if labels is not None else None)

    if start == 0:  # the starting point (PTQ / the pruned model) competes with every epoch
        report.best_epoch, report.best_metric = 0, evaluate()
        report.history.append({"epoch": 0, report.metric: report.best_metric})

    for epoch in range(start, epochs):
        batches = _batches(len(train), batch_size, np.random.default_rng([seed, epoch]), True)
        total, bar = 0.0, tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for b in bar:
            index = train[b]
            out = module(feeds(index))
            y = [out[names[i]] for i in float_outputs]
            t = [torch.from_numpy(targets[i][index]) for i in float_outputs] if labels is None else []
            lab = torch.from_numpy(labels[index]) if labels is not None else None
            loss = _loss(y, t, lab)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        metric = evaluate()
        report.history.append({"epoch": epoch + 1, "loss": total / max(1, len(train)), report.metric: metric})
        if progress:
            print(
                f"epoch {epoch + 1}/{epochs}: loss {total / max(1, len(train)):.5g}, held-out {report.metric} {metric:.4f}"
            )
        if not metric <= report.best_metric:  # NaN (no held-out) keeps the last epoch
            report.best_epoch, report.best_metric = epoch + 1, metric
            best_state = copy.deepcopy(module.state_dict())
        if checkpoint is not None:
            state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
            torch.save({**state, "report": report, "best": best_state}, checkpoint)
    module.load_state_dict(best_state)
    return report
