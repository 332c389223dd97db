"""``onnxcomp compare``: how far a rewritten model is from the original, on the user's data, and how fast.

Per model output: cosine, SQNR, max-abs error and, for outputs that look like class scores (float,
last axis > 1), top-1 agreement; with a ``label`` array in the data, the accuracy of both. Per node:
the *local* error (:mod:`onnxcomp.analysis.local_error`: the candidate's node fed the reference's
tensors, so it points at the culprit) next to the cumulative error of a full run. Then the latency
of both models in one interleaved run (ORT_ENABLE_ALL, 1 thread, median) and the file sizes.

Outputs are compared at ORT_ENABLE_ALL over all the data (what a deployment runs); the per-node
errors at ORT_DISABLE_ALL (intermediate tensors keep their names) over the first ``node_batches``.
Sums are streamed, so memory does not grow with the data.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxcomp.analysis.comparison import ComparisonReport, ErrorStats, Latency, NodeError, OutputError
from onnxcomp.analysis.local_error import plan_local_error
from onnxcomp.calibration.data import Batch, Factory, calibration_source
from onnxcomp.calibration.layouts import BatchAxis
from onnxcomp.errors import OnnxCompError
from onnxcomp.runtime import ALL_CORES, first_line, ort_session

#: Arrays in the data under these names are labels (one class index per sample), not model inputs.
LABEL_NAMES = ("label", "labels", "target", "targets")


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f"


def disk_bytes(path: Path) -> int:
    """The model file plus its ``NAME.data`` external-data file when there is one (onnxcomp's layout)."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _model_input_names(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def comparison_data(
    data: Any, model: onnx.ModelProto, batch_size: int, samples: int | None, batch_axis: BatchAxis | None = None
) -> tuple[Factory, str, np.ndarray | None, list[str]]:
    """``(batches, description, labels or None, notes)``: an .npz may also hold labels and other arrays."""
    labels, notes = None, []
    if isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() == ".npz" and Path(data).is_file():
        try:
            with np.load(data, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (OSError, ValueError) as exc:
            raise OnnxCompError(f"{data}: cannot read as .npz: {first_line(exc)}") from exc
        names = set(_model_input_names(model))
        for key in [k for k in arrays if k not in names]:
            value = arrays.pop(key)
            if key in LABEL_NAMES and value.ndim == 1 and value.dtype.kind in "iu":
                labels = value if samples is None else value[:samples]
            else:
                notes.append(f"array {key!r} in {Path(data).name} is not a model input: ignored")
        factory, desc = calibration_source(arrays, model, batch_size, samples, batch_axis)
        return factory, desc.replace("in-memory arrays", Path(data).name), labels, notes
    factory, desc = calibration_source(data, model, batch_size, samples, batch_axis)
    return factory, desc, labels, notes


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _session(model: onnx.ModelProto, label: str, level: str, threads: int) -> Any:
    try:
        return ort_session(model, level=level, threads=threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise OnnxCompError(f"{label}: onnxruntime cannot load it at ORT_{level.upper()}: {first_line(exc)}") from exc


def _feeds_for(session: Any, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch cast to the float type each session input wants (a float16 candidate of a float32 model)."""
    feeds = {}
    for spec in session.get_inputs():
        value = batch[spec.name]
        want = _ORT_TYPES.get(spec.type)
        feeds[spec.name] = value.astype(want) if want is not None and _is_float(value.dtype) else value
    return feeds


def _run(session: Any, names: list[str] | None, batch: Mapping[str, np.ndarray], label: str) -> list[Any]:
    try:
        return list(session.run(names, _feeds_for(session, batch)))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise OnnxCompError(f"{label}: onnxruntime failed on the data: {first_line(exc)}") from exc


def output_errors(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    batches: Factory,
    labels: np.ndarray | None,
    names: tuple[str, str],
) -> tuple[list[OutputError], dict[str, float], list[str]]:
    """Per shared output: cosine, SQNR, max-abs, top-1 agreement; accuracy when ``labels`` are given."""
    notes: list[str] = []
    cand_outputs = {o.name for o in candidate.graph.output}
    shared = [o for o in reference.graph.output if o.name in cand_outputs]
    missing = [o.name for o in reference.graph.output if o.name not in cand_outputs]
    if missing:
        notes.append(f"reference outputs missing from the candidate, not compared: {', '.join(missing)}")
    tensors = [o.name for o in shared if o.type.HasField("tensor_type")]
    notes += [f"output {o.name!r} is not a tensor: not compared" for o in shared if o.name not in tensors]
    if not tensors:
        raise OnnxCompError(f"{names[1]}: shares no tensor output with {names[0]}; nothing to compare")
    ref_sess = _session(reference, names[0], "all", ALL_CORES)
    cand_sess = _session(candidate, names[1], "all", ALL_CORES)
    stats = {n: ErrorStats() for n in tensors}
    predicted: dict[str, list[np.ndarray]] = {"reference": [], "candidate": []}
    for batch in batches():
        refs = _run(ref_sess, tensors, batch, names[0])
        tests = _run(cand_sess, tensors, batch, names[1])
        for i, (name, ref, test) in enumerate(zip(tensors, refs, tests, strict=True)):
            ref, test = np.asarray(ref), np.asarray(test)
            scores = _is_float(ref.dtype) and ref.ndim >= 2 and ref.shape[-1] > 1
            try:
                stats[name].add(ref, test, class_scores=scores)
            except OnnxCompError as exc:
                raise OnnxCompError(f"output {name!r}: {exc}; the models do not compute the same thing") from exc
            if labels is not None and i == 0 and scores:
                predicted["reference"].append(ref.reshape(-1, ref.shape[-1]).argmax(-1))
                predicted["candidate"].append(test.reshape(-1, test.shape[-1]).argmax(-1))
    outputs = [OutputError(n, s.cosine(), s.sqnr_db(), s.max_abs, s.top1()) for n, s in stats.items()]
    accuracy: dict[str, float] = {}
    if labels is not None and predicted["reference"]:
        got = {k: np.concatenate(v) for k, v in predicted.items()}
        if len(got["reference"]) == len(labels):
            accuracy = {k: float((v == labels).mean() * 100.0) for k, v in got.items()}
        else:
            notes.append(f"labels: {len(labels)} values but {len(got['reference'])} predictions: accuracy skipped")
    return outputs, accuracy, notes


def node_errors(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, batches: Factory, max_batches: int
) -> tuple[list[NodeError], int, list[str]]:
    """Local and cumulative error per matched candidate node over the first ``max_batches`` batches."""
    plan = plan_local_error(reference, candidate)
    notes = [f"node {node}: {reason}" for node, reason in plan.skipped]
    if not plan.targets:
        notes.append(
            "per-node error skipped: the candidate shares no node output with the reference "
            "(the graphs do not match; onnxcomp keeps tensor names, other tools may not)"
        )
        return [], 0, notes
    tensors = list(dict.fromkeys(t.tensor for t in plan.targets))
    ref_names = list(dict.fromkeys(plan.feeds + tensors))
    ref_sess = ort_session(reference, level="disable", threads=ALL_CORES, expose=ref_names)
    cand_sess = ort_session(candidate, level="disable", threads=ALL_CORES, expose=tensors)
    local_sess: Any = None
    local_stats = {t.local_name: ErrorStats() for t in plan.targets}
    cumulative = {t: ErrorStats() for t in tensors}
    seen = 0
    for batch in batches():
        if seen >= max_batches:
            break
        ref = dict(zip(ref_names, (np.asarray(v) for v in ref_sess.run(ref_names, dict(batch))), strict=True))
        if local_sess is None:
            local = plan.local_model(candidate, {n: ref[n].dtype for n in plan.feeds})
            try:
                local_sess = ort_session(local, level="disable", threads=ALL_CORES)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
                notes.append(f"per-node local error skipped: onnxruntime cannot run the local model: {first_line(exc)}")
                return [], 0, notes
        locals_ = local_sess.run([t.local_name for t in plan.targets], {n: ref[n] for n in plan.feeds})
        for target, value in zip(plan.targets, locals_, strict=True):
            value = np.asarray(value)
            if _is_float(ref[target.tensor].dtype) and value.shape == ref[target.tensor].shape:
                local_stats[target.local_name].add(ref[target.tensor], value)
        for name, value in zip(tensors, cand_sess.run(tensors, _feeds_for(cand_sess, batch)), strict=True):
            value = np.asarray(value)
            if _is_float(ref[name].dtype) and value.shape == ref[name].shape:
                cumulative[name].add(ref[name], value)
        seen += 1
    rows = []
    for t in plan.targets:
        s = local_stats[t.local_name]
        if s.count == 0:
            continue  # integer tensors (shapes, indices): no SQNR to speak of
        rows.append(
            NodeError(t.node, t.op, t.tensor, s.sqnr_db(), s.cosine(), s.max_abs, cumulative[t.tensor].sqnr_db())
        )
    rows.sort(key=lambda r: (r.local_sqnr_db, r.node))
    return rows, seen, notes


def sample_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One generated input per graph input from its declared shape (symbolic dims = 1): normal floats, zero integers."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            raise OnnxCompError(f"input {vi.name!r} is not a tensor: cannot generate a sample for it")
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        feeds[vi.name] = rng.standard_normal(dims).astype(dtype) if _is_float(dtype) else np.zeros(dims, dtype)
    return feeds


def interleaved_latency(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    runs: int = 50,
    warmup: int = 5,
) -> Latency:
    """Median ``session.run`` time of both models (ORT_ENABLE_ALL, 1 thread), runs interleaved.

    Interleaving (and alternating which model goes first) exposes both to the same machine load,
    so the ratio stays meaningful on a busy machine where two separate timings would not.
    """
    sessions = [_session(reference, "reference", "all", 1), _session(candidate, "candidate", "all", 1)]
    inputs = [_feeds_for(s, feeds) for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, inputs, strict=True):
            s.run(None, f)
    times: list[list[float]] = [[], []]
    for i in range(max(1, runs)):
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            sessions[k].run(None, inputs[k])
            times[k].append((time.perf_counter() - start) * 1e3)
    return Latency(statistics.median(times[0]), statistics.median(times[1]), max(1, runs))


def first_batch(batches: Factory) -> Batch:
    """The first batch of a data source (the latency sample)."""
    return next(iter(batches()))


def compare_models(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    data: Any,
    *,
    names: tuple[str, str] = ("reference", "candidate"),
    paths: tuple[Path | None, Path | None] = (None, None),
    batch_size: int = 32,
    samples: int | None = None,
    node_batches: int = 4,
    runs: int = 50,
    latency_batch: int = 1,
    batch_axis: BatchAxis | None = None,
) -> ComparisonReport:
    """Everything ``onnxcomp compare`` measures (see the module docstring); ``runs=0`` skips the latency."""
    ref_inputs, cand_inputs = _model_input_names(reference), _model_input_names(candidate)
    if sorted(ref_inputs) != sorted(cand_inputs):
        raise OnnxCompError(
            f"{names[1]} has inputs {', '.join(cand_inputs)} but {names[0]} has {', '.join(ref_inputs)}; "
            "compare needs two models with the same inputs"
        )
    batches, desc, labels, notes = comparison_data(data, reference, batch_size, samples, batch_axis)
    report = ComparisonReport(names[0], names[1], desc, notes=notes)
    report.outputs, report.accuracy, more = output_errors(reference, candidate, batches, labels, names)
    report.notes += more
    if node_batches > 0:
        report.nodes, report.node_batches, more = node_errors(reference, candidate, batches, node_batches)
        report.notes += more
    if runs > 0:
        sample, _, _, _ = comparison_data(data, reference, latency_batch, latency_batch, batch_axis)
        report.latency = interleaved_latency(reference, candidate, first_batch(sample), runs=runs)
    for key, path, model in zip(("reference", "candidate"), paths, (reference, candidate), strict=True):
        report.sizes[key] = disk_bytes(path) if path is not None else model.ByteSize()
    return report
