"""The Python API: the same pass manager the CLI drives.

>>> import onnxcomp
>>> report = onnxcomp.fuse("model.onnx", "model.fused.onnx")
>>> report = onnxcomp.compress("model.onnx", "recipe.toml", "out.onnx")
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxcomp.analysis.compare import compare_models
from onnxcomp.analysis.comparison import ComparisonReport
from onnxcomp.errors import OnnxCompError
from onnxcomp.execute import LOCATE, CalibrationLike, ModelLike, RecipeLike, as_model, as_recipe, run_plan
from onnxcomp.flags import (
    FUSE_PIPELINE,
    DecomposeLayers,
    RunOptions,
    decompose_passes,
    quantize_options,
    quantize_passes,
    renamed_keyword,
    sparsify_passes,
    with_fusions,
)
from onnxcomp.framework import (
    Recipe,
    RunReport,
    make_pass,
)
from onnxcomp.model_io import write_text_atomic

_RUN_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(RunOptions))


def _run_options(keywords: Mapping[str, Any]) -> RunOptions:
    """The :class:`RunOptions` among an API call's keywords (every front end names them alike)."""
    return RunOptions(**{name: keywords[name] for name in _RUN_OPTION_NAMES if name in keywords})


def compress(
    model: ModelLike,
    recipe: RecipeLike,
    output: str | os.PathLike[str] | None = None,
    *,
    calibration: CalibrationLike = None,
    calib_samples: int | None = None,
    batch_size: int = 16,
    batch_axis: Mapping[str, int | None] | None = None,
    workers: int = 1,
    ray: str | None = None,
    calib_memory: float | None = None,
    calib_partitions: int = 1,
    force: bool = False,
    progress: bool = False,
    external_data: bool | None = None,
    validate: str | None = None,
) -> RunReport:
    """Run a recipe (or a list of passes) on a model; save it and its resolved recipe if ``output``.

    ``calibration`` is an .npz file, a directory of .npz/.npy files, or any iterable of
    ``{input name: array}`` batches (samples along each input's batch dim, found from the model's
    symbolic dims; ``batch_axis={"state": 1, "sr": None}`` overrides it, None = given once);
    ``calib_samples`` bounds the samples used. ``workers`` (local processes) or ``ray`` (a Ray
    address, ``"auto"``) shard calibration; ``calib_memory`` (GB) bounds the tensors it exposes per
    batch; ``calib_partitions`` runs the graph in that many partitions, one session each
    (docs/scale.md). Records the passes make are saved beside the output as
    ``OUT.<feature>_record.json``. ``validate`` overrides the recipe's check of the result
    (``locate``, the other front ends' mode, ``each``, ``end``; ``none`` writes it unchecked);
    every front end takes these run keywords.
    """
    run = _run_options(locals())
    return run_plan(model, as_recipe(recipe), output, run)


def fuse(
    model: ModelLike,
    output: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    external_data: bool | None = None,
    validate: str | None = None,
) -> RunReport:
    """Deployment fusions (BN folding, affine folding, MatMul+Add -> Gemm, cleanup)."""
    return compress(
        model,
        list(FUSE_PIPELINE),
        output,
        force=force,
        progress=progress,
        external_data=external_data,
        validate=validate,
    )


def quantize(
    model: ModelLike,
    output: str | os.PathLike[str] | None = None,
    *,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    weights: str | None = None,
    activations: str | None = None,
    granularity: str | None = None,
    observer: str | None = None,
    weight_observer: str | None = None,
    dynamic: bool = False,
    dynamic_granularity: str = "token",
    symmetric_activations: bool | None = None,
    skip: Sequence[str] = (),
    emit: str | None = None,
    fp4_storage: str | None = None,
    scale_format: str | None = None,
    weight_only_format: str | None = None,
    float_weight_format: str | None = None,
    embeddings: str | None = None,
    placement: str | None = None,
    reports: bool = True,
    bias_correction: str | None = None,
    weight_algorithm: str | None = None,
    act_order: bool | None = None,
    gptq_damp: float | None = None,
    smoothquant: float | str | None = None,
    equalize: bool | None = None,
    accuracy_target: str | None = None,
    evaluator: str | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    sensitivity: bool | None = None,
    trial_workers: int | None = None,
    target: str | None = None,
    ascend_int4: bool | None = None,
    simulation_output: str | os.PathLike[str] | None = None,
    calibration: CalibrationLike = None,
    calib_samples: int | None = None,
    batch_size: int = 16,
    batch_axis: Mapping[str, int | None] | None = None,
    workers: int = 1,
    ray: str | None = None,
    calib_memory: float | None = None,
    calib_partitions: int = 1,
    fuse: bool = True,
    force: bool = False,
    progress: bool = False,
    external_data: bool | None = None,
    validate: str | None = None,
) -> RunReport:
    """Post-training quantization: fusions (unless ``fuse=False``) then the ``quantize`` pass.

    The format keywords are those of :func:`onnxcomp.flags.quantize_options`; ``config`` is a
    TOML file or mapping of ``quantize`` pass options that they override.
    ``weight_only_format`` writes weight-only MatMul/Gemm as ``matmulnbits`` (onnxruntime's packed
    kernel, the default) or ``dq`` (DequantizeLinear, any runtime); ``float_weight_format`` writes FP8 /
    MXFP8 weights as ``cast`` (Cast(codes) * scale, decoded once by onnxruntime at load, the default) or
    ``dq`` (DequantizeLinear, for runtimes that read FP8 Q/DQ); ``embeddings`` (``int8`` per row,
    ``int4`` per group of 32) also stores Gather tables in low bits; ``reports=False`` skips the SQNR
    and fused-kernel reports; ``bias_correction`` (``full`` or ``fast``) subtracts each layer's mean
    output error on the calibration data through its bias; ``weight_algorithm`` ``gptq`` (with
    ``act_order``, ``gptq_damp``) or ``awq`` replaces round-to-nearest weights; ``smoothquant`` (alpha
    in [0, 1] or ``"auto"``) and ``equalize`` rescale channels first, exactly in float
    (docs/algorithms.md). ``accuracy_target`` (``"cos:0.995"``, ``"agree:0.99"``, ``"drop:0.01"``
    with ``evaluator="eval.py:func"``) searches for the most compression meeting it, scored on
    ``eval_data`` (default: the calibration data) (docs/accuracy.md). With
    ``simulation_output``, the fake-quant simulation model is written there too. ``target="ascend"``
    writes ATC's deploy model to ``output``, AMCT's fake-quant model to ``OUT.fake_quant.onnx`` and
    the record to ``OUT.record.txt`` (``ascend_int4`` allows INT4 weights; docs/ascend.md).
    """
    options = quantize_options(
        config,
        weights=weights,
        activations=activations,
        granularity=granularity,
        observer=observer,
        weight_observer=weight_observer,
        dynamic=dynamic,
        dynamic_granularity=dynamic_granularity,
        symmetric_activations=symmetric_activations,
        skip=skip,
        emit=emit,
        fp4_storage=fp4_storage,
        scale_format=scale_format,
        weight_only_format=weight_only_format,
        float_weight_format=float_weight_format,
        embeddings=embeddings,
        placement=placement,
        reports=reports,
        bias_correction=bias_correction,
        weight_algorithm=weight_algorithm,
        act_order=act_order,
        gptq_damp=gptq_damp,
        smoothquant=smoothquant,
        equalize=equalize,
        accuracy_target=accuracy_target,
        evaluator=evaluator,
        eval_data=str(eval_data) if eval_data is not None else None,
        sensitivity=sensitivity,
        trial_workers=trial_workers,
        target=target,
        ascend_int4=ascend_int4,
    )
    run = _run_options(locals())
    if simulation_output is not None and options.get("target") == "ascend":
        raise OnnxCompError("--simulation with --target ascend: the simulation is written as OUT.fake_quant.onnx")
    report = run_plan(model, Recipe(quantize_passes(options, fuse), validate=LOCATE), output, run)
    if simulation_output is not None:
        sim = {**options, "emit": "simulate", "report_batches": 0}
        run_plan(model, Recipe(quantize_passes(sim, fuse), validate=LOCATE), simulation_output, run)
    return report


def distill(
    model: ModelLike,
    output: str | os.PathLike[str] | None = None,
    *,
    iters: int | None = None,
    lr: float | None = None,
    batch_rows: int | None = None,
    round_weight: float | None = None,
    learn_rounding: bool | None = None,
    learn_scales: bool | None = None,
    learn_bias: bool | None = None,
    learn_ranges: bool | None = None,
    balance_channels: bool | None = None,
    teacher_input: bool | None = None,
    simulation_output: str | os.PathLike[str] | None = None,
    fuse: bool = True,
    **keywords: Any,
) -> RunReport:
    """Layer-wise distillation: :func:`quantize` with learned rounding, scales and biases (docs/distill.md).

    ``keywords`` are the format keywords of :func:`quantize` (``weights``, ``activations``,
    ``granularity``, ``config``, ...) and the run options (``calibration``, ``calib_samples``,
    ``batch_size``, ``force``, ...); it writes the same outputs. ``iters`` (Adam steps per block),
    ``lr``, ``batch_rows`` (output rows per step), ``round_weight`` and the ``learn_*`` switches
    tune the learning (``learn_ranges``: each block input's activation clipping range;
    ``balance_channels``: each output channel's error weighted by 1 / its energy);
    ``teacher_input`` feeds each block the float model's input instead of the student's. Needs
    ``calibration`` (unlabelled inputs).
    """
    run_names = set(_RUN_OPTION_NAMES)
    format_names = set(inspect.signature(quantize_options).parameters)
    unknown = sorted(set(keywords) - run_names - format_names)
    if unknown:
        raise TypeError(f"distill() got unexpected keyword argument(s): {', '.join(unknown)}")
    options = quantize_options(**{k: v for k, v in keywords.items() if k in format_names and k not in run_names})
    learning = {
        "iters": iters,
        "lr": lr,
        "batch_rows": batch_rows,
        "round_weight": round_weight,
        "learn_rounding": learn_rounding,
        "learn_scales": learn_scales,
        "learn_bias": learn_bias,
        "learn_ranges": learn_ranges,
        "balance_channels": balance_channels,
        "teacher_input": teacher_input,
    }
    options = {**options, **{k: v for k, v in learning.items() if v is not None}}
    run = _run_options(keywords)
    report = run_plan(model, Recipe(with_fusions([make_pass("distill", options)], fuse), validate=LOCATE), output, run)
    if simulation_output is not None:
        sim = {**options, "emit": "simulate", "report_batches": 0, "kernel_report": False}
        run_plan(
            model, Recipe(with_fusions([make_pass("distill", sim)], fuse), validate=LOCATE), simulation_output, run
        )
    return report


def decompose(
    model: ModelLike,
    output: str | os.PathLike[str] | None = None,
    *,
    layers: DecomposeLayers | None = None,
    rank_rule: str | None = None,
    align: int | None = None,
    replay: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
    calibration: CalibrationLike = None,
    calib_samples: int | None = None,
    batch_size: int = 16,
    batch_axis: Mapping[str, int | None] | None = None,
    workers: int = 1,
    ray: str | None = None,
    calib_memory: float | None = None,
    calib_partitions: int = 1,
    fuse: bool = True,
    force: bool = False,
    progress: bool = False,
    external_data: bool | None = None,
    validate: str | None = None,
    ops: DecomposeLayers | None = None,
) -> RunReport:
    """Low-rank tensor decomposition: fusions (unless ``fuse=False``) then ``decompose_conv``
    (``layers="conv"``, the default), ``decompose_matmul`` (``"matmul"``) or both (``"all"``).

    ``rank_rule`` is ``auto`` (the default), ``energy:E``, ``ratio:R`` or ``rank:N`` and ``align``
    the rank multiple (default 16); ``calibration`` enables the least-squares refit of the
    second factors; ``replay`` applies a saved ``OUT.decomposition_record.json`` exactly;
    ``options`` are further pass options (each pass takes the ones it knows; the explicit keywords
    win). The record is saved beside ``output`` as ``OUT.decomposition_record.json``.
    ``ops`` is the deprecated spelling of ``layers``.
    """
    chosen: DecomposeLayers = renamed_keyword(layers, ops, "ops", "layers") or "conv"
    passes = decompose_passes(
        layers=chosen, rank_rule=rank_rule, align=align, replay=replay, options=options, fuse=fuse
    )
    run = _run_options(locals())
    return run_plan(model, Recipe(passes, validate=LOCATE), output, run)


def sparsify(
    model: ModelLike,
    output: str | os.PathLike[str] | None = None,
    *,
    pattern: str | None = None,
    ratio: float | None = None,
    scope: str = "layer",
    ratios: Mapping[str, float] | None = None,
    round_to: int = 1,
    criterion: str = "l2",
    refit: bool | None = None,
    skip: Sequence[str] = (),
    quantize: str | None = None,
    activations: str | None = None,
    calibration: CalibrationLike = None,
    calib_samples: int | None = None,
    batch_size: int = 16,
    batch_axis: Mapping[str, int | None] | None = None,
    workers: int = 1,
    ray: str | None = None,
    calib_memory: float | None = None,
    calib_partitions: int = 1,
    fuse: bool = True,
    force: bool = False,
    progress: bool = False,
    external_data: bool | None = None,
    validate: str | None = None,
    prune_ratio: float | None = None,
    reconstruct: bool | None = None,
    method: str | None = None,
    dense_layers: int | None = None,
) -> RunReport:
    """Sparsity: fusions (unless ``fuse=False``), then n:m ``pattern`` or channel pruning by ``ratio``.

    An n:m ``pattern`` is chosen by ``method``: ``"sparsegpt"`` (mask by second-order saliency and
    compensating update of the kept weights, from calibration data; the default when
    ``calibration`` is given) or ``"magnitude"`` (the default without data); ``dense_layers=N``
    leaves the N layers SparseGPT fits worst dense.

    Channel pruning refits the consumers by least squares when calibration data is given
    (``refit=None``), and can choose channels from data (``criterion="data"``). With
    ``quantize`` (a weight format: ``"int8"``, ``"int4"``, ...) the sparse model is quantized
    next (activations: ``activations``, default none = weight-only): the combined recipe.
    ``prune_ratio`` and ``reconstruct`` are the deprecated spellings of ``ratio`` and ``refit``.
    """
    ratio = renamed_keyword(ratio, prune_ratio, "prune_ratio", "ratio")
    refit = renamed_keyword(refit, reconstruct, "reconstruct", "refit")
    options: dict[str, Any] = {
        "scope": scope,
        "round_to": round_to,
        "criterion": criterion,
        "refit": calibration is not None if refit is None else refit,
        "ratios": dict(ratios or {}),
    }
    passes = sparsify_passes(
        pattern=pattern,
        ratio=ratio,
        fuse=fuse,
        prune_options=options,
        skip=skip,
        quantize=quantize,
        activations=activations,
        method=method,
        dense_layers=dense_layers,
    )
    run = _run_options(locals())
    return run_plan(model, Recipe(passes, validate=LOCATE), output, run)


def compare(
    reference: ModelLike,
    candidate: ModelLike,
    data: CalibrationLike,
    *,
    runs: int = 50,
    samples: int | None = None,
    batch_size: int = 32,
    node_batches: int = 4,
    batch_axis: Mapping[str, int | None] | None = None,
    json_output: str | os.PathLike[str] | None = None,
) -> ComparisonReport:
    """How far ``candidate`` (a compressed model) is from ``reference`` on ``data``, and how fast.

    Per output: cosine, SQNR, max-abs error, top-1 agreement for class scores (and accuracy when
    an .npz also holds a ``label`` array); per node, over the first ``node_batches`` batches, the
    local error (the candidate's node fed the reference's tensors) next to the cumulative one;
    the latency of both in one interleaved run (ORT_ENABLE_ALL, 1 thread, median of ``runs``;
    0 skips it) and the file sizes. ``data`` takes the calibration forms (.npz, directory, dicts
    of arrays, batches; ``batch_axis`` as in :func:`compress`); ``samples`` bounds it. With
    ``json_output`` the report is also saved as JSON.
    """
    if data is None:
        raise OnnxCompError("compare needs data: an .npz named by model input, a directory of them, or batches")
    ref_proto, ref_path = as_model(reference)
    cand_proto, cand_path = as_model(candidate)
    names = (str(ref_path or "reference"), str(cand_path or "candidate"))
    report = compare_models(
        ref_proto,
        cand_proto,
        data,
        names=names,
        paths=(ref_path, cand_path),
        batch_size=batch_size,
        samples=samples,
        node_batches=node_batches,
        runs=runs,
        batch_axis=batch_axis,
    )
    if json_output is not None:
        write_text_atomic(Path(json_output), json.dumps(report.to_json(), indent=1) + "\n")
    return report


__all__ = [
    "compare",
    "compress",
    "decompose",
    "distill",
    "fuse",
    "quantize",
    "quantize_options",
    "sparsify",
    "with_fusions",
]
