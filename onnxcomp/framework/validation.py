"""Validation that means it: run a rewritten model once at ORT_ENABLE_ALL and compare with the input.

Creating a session proves little: onnxruntime fuses Q/DQ patterns into integer kernels when the
session is created but checks some of their parameters only when a kernel first runs (a
per-channel zero point on a batched MatMul weight loads, then fails at the first inference). So
after a modifying pass the manager runs the model once on one real sample (the first calibration
batch, else inputs generated from the declared shapes) and compares each output with the input
model's at a loose bound: finite where the reference is finite, same shape, cosine > 0.5. The bound
catches broken graphs (a wrong transpose, a scale off by an axis), not quantization noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxcomp.errors import OnnxCompError, ValidationError
from onnxcomp.runtime import first_line, ort_session

#: Cosine similarity below which an output is broken, not merely quantized (W4 on a tiny model
#: stays above 0.9; a transposed weight or a wrong scale axis falls to ~0).
MIN_COSINE = 0.5
#: Symbolic dims of generated inputs (batch, sequence length) are given this size: cheap, valid.
GENERATED_DIM = 1


@dataclass
class InferenceSample:
    """One input batch and the input model's outputs on it (the reference of every check)."""

    feeds: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    static_shapes: set[str]  # outputs whose declared shape is fully static (a shape change is a bug)
    source: str  # where the feeds come from, for messages


def generated_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray] | str:
    """Inputs from the declared shapes (symbolic dims -> 1), or why some input cannot be generated."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in inits:
            continue  # an overridable initializer keeps its stored value
        if value.type.WhichOneof("value") != "tensor_type":
            return f"input {value.name!r} is not a tensor"
        ttype = value.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError, ValueError):
            return f"input {value.name!r} has element type {ttype.elem_type}"
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else GENERATED_DIM for d in ttype.shape.dim]
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b":
            feeds[value.name] = rng.integers(0, 2, dims).astype(bool)
        elif dtype.kind in "iu":
            feeds[value.name] = rng.integers(0, 2, dims).astype(dtype)  # 0/1: valid ids, masks and indices
        else:
            return f"input {value.name!r} has element type {dtype}"
    return feeds


def _static_outputs(model: onnx.ModelProto) -> set[str]:
    static = set()
    for value in model.graph.output:
        if value.type.WhichOneof("value") != "tensor_type" or not value.type.tensor_type.HasField("shape"):
            continue
        if all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim):
            static.add(value.name)
    return static


def inference_sample(
    model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]] | None = None, file: Path | None = None
) -> InferenceSample | str:
    """The reference run of ``model`` on the first calibration batch (else generated inputs), or why none.

    The reference runs at ORT_ENABLE_ALL too, so what onnxruntime's own optimizations do to the
    input model (a BatchNorm fold that overflows) is not blamed on a pass. When the input model itself does not run on the sample
    (an input of a kind we cannot generate, a shape input), there is nothing to compare against
    and the reason is returned: validation then only creates a session, as before. ``file`` (the
    file ``model`` was read from, unchanged) is loaded by onnxruntime directly: no serialisation.
    """
    first: Mapping[str, np.ndarray] | None = None
    if batches is not None:
        try:
            first = next(iter(batches), None)
        except OnnxCompError:
            first = None  # bad calibration data is reported by the pass that reads it
    inits = {t.name for t in model.graph.initializer}
    covered = first is not None and all(v.name in first for v in model.graph.input if v.name not in inits)
    generated: dict[str, np.ndarray] | str = {} if covered else generated_feeds(model)  # only what is missing
    if first is not None:
        feeds = {**(generated if isinstance(generated, dict) else {}), **{k: np.asarray(v) for k, v in first.items()}}
        source = "the first calibration batch"
    elif isinstance(generated, str):
        return f"no sample to run: {generated}"
    else:
        feeds, source = generated, "inputs generated from the declared shapes"
    try:
        # One run: packing the weights (a copy of each, and most of a session's start) would not pay
        one_run = {"session.disable_prepacking": "1"}
        session = ort_session(model if file is None else Path(file), level="all", config=one_run, arena=False)
        wanted = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        return f"the input model does not run on {source}: {first_line(exc)}"
    expected = {n: v for n, v in zip(names, values, strict=True) if isinstance(v, np.ndarray)}
    return InferenceSample(feeds, expected, _static_outputs(model), source)


def _cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    x, y = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 or ny == 0.0:
        return None  # an all-zero output has no direction to compare
    return float(np.dot(x, y) / (nx * ny))


def check_inference(session: Any, sample: InferenceSample, compare_values: bool = True) -> None:
    """Run ``session`` (a model at ORT_ENABLE_ALL) on the sample; ValidationError naming what broke.

    ``compare_values=False`` (after pruning or low-rank passes, whose error the user chose) checks
    that it runs, the shapes and finiteness, not the cosine bound.
    """
    wanted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in sample.feeds.items() if k in wanted}
    names = [n for n in (o.name for o in session.get_outputs()) if n in sample.expected]
    try:
        values = session.run(names, feeds)
    except Exception as exc:  # noqa: BLE001
        raise ValidationError(
            f"onnxruntime fails on its first inference at ORT_ENABLE_ALL ({sample.source}): {first_line(exc)}"
        ) from exc
    for name, got in zip(names, values, strict=True):
        want = sample.expected[name]
        got = np.asarray(got)
        if got.ndim != want.ndim or (got.shape != want.shape and name in sample.static_shapes):
            raise ValidationError(f"output {name!r} has shape {list(got.shape)}, the input model's {list(want.shape)}")
        if got.shape != want.shape or want.dtype.kind not in "fc":
            continue  # a data-dependent size (detections after NMS) or labels: nothing to compare
        if got.dtype.kind in "fc":
            bad = ~np.isfinite(got) & np.isfinite(want)
            if bad.any():
                raise ValidationError(
                    f"output {name!r} has {int(bad.sum())} non-finite values where the input model's are finite"
                )
        cosine = _cosine(got, want) if compare_values else None
        if cosine is not None and cosine < MIN_COSINE:
            raise ValidationError(
                f"output {name!r} no longer matches the input model's (cosine {cosine:.3f} < {MIN_COSINE} on "
                f"{sample.source}): the rewrite broke the graph, beyond quantization error"
            )
