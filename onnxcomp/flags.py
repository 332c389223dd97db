"""Front-end flags to pass lists: the one translation the CLI, the Python API and recipes share.

Every compression front end runs the deployment fusions first (BatchNorm is folded before weights
are quantized, pruned or factored), then its feature passes. As a TOML recipe, ``onnxcomp sparsify
--ratio 0.25 --round-to 8 --quantize int8`` is::

    [[passes]]
    pass = "fold_batchnorm"
    [[passes]]
    pass = "prune_channels"
    ratio = 0.25
    round_to = 8
    [[passes]]
    pass = "quantize"
    weights = { dtype = "int8", granularity = "channel" }

Old spellings of renamed options are accepted for one release with a ``DeprecationWarning``
(:func:`renamed_keyword`).
"""

from __future__ import annotations

import os
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from onnxcomp.calibration.shard import CalibrationResources
from onnxcomp.errors import ConfigError, OnnxCompError
from onnxcomp.framework import Pass, get_pass, make_pass, option_fields
from onnxcomp.framework.recipe import VALIDATE_MODES

#: The order ``onnxcomp fuse`` runs the deployment fusions in.
FUSE_PIPELINE: tuple[str, ...] = (
    "fold_weight_constants",
    "remove_identity",
    "fold_batchnorm",
    "fuse_matmul_add",
    "fold_affine",
    "lower_batchnorm",
    "fuse_hardswish",
    "flush_denormals",
    "dedupe_initializers",
)

#: Which decomposition passes ``layers`` selects.
DECOMPOSE_LAYERS: dict[str, tuple[str, ...]] = {
    "conv": ("decompose_conv",),
    "matmul": ("decompose_matmul",),
    "all": ("decompose_conv", "decompose_matmul"),
}
DecomposeLayers = Literal["conv", "matmul", "all"]


@dataclass(frozen=True)
class RunOptions:
    """How every front end (``compress``, ``fuse``, ``quantize``, ``sparsify``, ``decompose``) runs.

    ``calibration``: an .npz file, a directory of .npz/.npy files, or an iterable of
    ``{input name: array}`` batches; ``calib_samples`` bounds the calibration *samples* used (None:
    all); ``batch_size`` is the number of samples per calibration batch; ``batch_axis`` overrides
    the axis along which an input's calibration arrays stack samples (``{"state": 1}``; ``None``:
    the input has no sample axis and is given once). ``workers`` / ``ray`` shard calibration over
    local processes / a Ray cluster; ``calib_memory`` (GB) bounds the tensors calibration exposes
    per batch (None: a quarter of the machine's memory); ``calib_partitions`` runs the graph in
    that many consecutive partitions, one session each, so a batch's live tensors are about one
    partition's (1: all at once). ``validate`` overrides how the result is checked (None: the
    recipe's mode; the front ends' is ``locate``; ``"none"`` writes the output unchecked, see
    :class:`onnxcomp.framework.PassManager`). (``fuse``, the other shared keyword,
    decides the pass list: :func:`with_fusions`.)
    """

    calibration: Any = None
    calib_samples: int | None = None
    batch_size: int = 16
    force: bool = False
    progress: bool = False
    external_data: bool | None = None
    batch_axis: Mapping[str, int | None] | None = None
    workers: int = 1
    ray: str | None = None
    calib_memory: float | None = None
    calib_partitions: int = 1
    validate: str | None = None

    def validation(self) -> str | None:
        """``validate``, checked (ConfigError on an unknown mode)."""
        if self.validate is not None and self.validate not in VALIDATE_MODES:
            raise ConfigError(f"validate must be one of {', '.join(VALIDATE_MODES)}, got {self.validate!r}")
        return self.validate

    def calibration_resources(self) -> CalibrationResources:
        """The calibration resources of these options (ConfigError on a bad value)."""
        memory = self.calib_memory
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or not memory > 0):
            raise ConfigError(f"calib_memory must be a positive number of GB, got {memory!r}")
        parts = self.calib_partitions
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise ConfigError(
                f"calib_partitions must be a positive integer (1: the whole graph at once), got {parts!r}"
            )
        budget = None if memory is None else max(1, int(memory * 2**30))
        return CalibrationResources(self.workers, self.ray, budget, partitions=parts)


def renamed_keyword(new_value: Any, old_value: Any, old: str, new: str, default: Any = None) -> Any:
    """The value of a renamed keyword: ``new_value``, or ``old_value`` with a DeprecationWarning."""
    if old_value is None:
        return new_value
    warnings.warn(
        f"{old!r} is deprecated and will be removed in the next release; use {new!r}", DeprecationWarning, stacklevel=3
    )
    if new_value is not None and new_value != default and new_value != old_value:
        raise ConfigError(f"both {old!r} (deprecated) and {new!r} given; use {new!r} only")
    return old_value


def with_fusions(passes: Sequence[Pass], fuse: bool = True) -> list[Pass]:
    """``passes`` preceded by the deployment fusions (as pass instances) when ``fuse``."""
    return [*(make_pass(name) for name in (FUSE_PIPELINE if fuse else ())), *passes]


def quantize_options(
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
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
    eval_data: str | None = None,
    sensitivity: bool | None = None,
    trial_workers: int | None = None,
    target: str | None = None,
    ascend_int4: bool | None = None,
) -> dict[str, Any]:
    """The ``quantize`` pass options from a config (file or mapping) plus flag-style overrides."""
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        path = Path(config)
        if not path.exists():
            raise OnnxCompError(f"{path}: no such config file")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise OnnxCompError(f"{path}: not valid TOML: {exc}") from exc
        data.pop("pass", None)

    def role(key: str, fmt: str | None, extra: dict[str, Any]) -> None:
        if fmt is None and not extra:
            return
        current = data.get(key, "int8")
        table = {"dtype": current} if isinstance(current, str) else dict(current)
        if fmt is not None:
            table = {"dtype": fmt} if fmt.lower() == "none" else {**table, "dtype": fmt}
        if str(table.get("dtype", "")).lower() != "none":
            table.update(extra)
        data[key] = table

    w_extra: dict[str, Any] = {}
    if granularity is not None:
        w_extra["granularity"] = granularity
    if weight_observer is not None:
        w_extra["observer"] = weight_observer
    if scale_format is not None:
        w_extra["scale_format"] = scale_format
    role("weights", weights, w_extra)
    a_extra: dict[str, Any] = {}
    if dynamic:
        if dynamic_granularity not in ("token", "tensor"):
            raise ConfigError(f"dynamic_granularity must be 'token' or 'tensor', got {dynamic_granularity!r}")
        per_token = dynamic_granularity == "token"
        a_extra["granularity"] = "token" if per_token else "dynamic"
        a_extra["symmetric"] = per_token  # per tensor: uint8 asymmetric, as DynamicQuantizeLinear computes
        if not per_token and activations is None:
            activations = "uint8"
    if observer is not None:
        a_extra["observer"] = observer
    if symmetric_activations is not None:
        a_extra["symmetric"] = symmetric_activations
    role("activations", activations, a_extra)
    if skip:
        data["skip"] = [*data.get("skip", []), *skip]
    if emit is not None:
        data["emit"] = emit
    if fp4_storage is not None:
        data["fp4_storage"] = fp4_storage
    if weight_only_format is not None:
        data["weight_only_format"] = weight_only_format
    if float_weight_format is not None:
        data["float_weight_format"] = float_weight_format
    if embeddings is not None:
        data["embeddings"] = embeddings
    if placement is not None:
        data["placement"] = placement
    for key, value in (
        ("bias_correction", bias_correction),
        ("weight_algorithm", weight_algorithm),
        ("act_order", act_order),
        ("gptq_damp", gptq_damp),
        ("smoothquant", smoothquant),
        ("equalize", equalize),
        ("accuracy_target", accuracy_target),
        ("evaluator", evaluator),
        ("eval_data", eval_data),
        ("sensitivity", sensitivity),
        ("trial_workers", trial_workers),
        ("target", target),
        ("ascend_int4", ascend_int4),
    ):
        if value is not None:
            data[key] = value
    if not reports:
        data["report_batches"] = 0
        data["kernel_report"] = False
    return data


def quantize_passes(options: Mapping[str, Any], fuse: bool = True) -> list[Pass]:
    """Fusions (unless ``fuse=False``), then the ``quantize`` pass with ``options``."""
    return with_fusions([make_pass("quantize", options)], fuse)


def sparsify_passes(
    *,
    pattern: str | None = None,
    ratio: float | None = None,
    fuse: bool = True,
    prune_options: Mapping[str, Any] | None = None,
    skip: Sequence[str] = (),
    quantize: str | None = None,
    activations: str | None = None,
    granularity: str = "channel",
    method: str | None = None,
    dense_layers: int | None = None,
) -> list[Pass]:
    """Fusions (unless ``fuse=False``), one sparsity pass, then ``quantize`` if a weight format is given.

    One kind of sparsity per run: ``pattern`` (n:m, ``sparsify_2to4``, chosen by ``method``:
    ``"magnitude"`` or ``"sparsegpt"``; None = sparsegpt with calibration data) or ``ratio`` (channel
    pruning, ``prune_channels``). ``activations`` defaults to ``none`` (weight-only) for the quantize
    step; pass ``"int8"`` (with calibration data) for static INT8 activations. The quantizer keeps
    every pruned zero exactly zero.
    """
    if (pattern is None) == (ratio is None):
        raise OnnxCompError(
            "choose one kind of sparsity: a pattern (e.g. --pattern 2:4) or a channel ratio (--ratio 0.3)"
        )
    if method is not None and pattern is None:
        raise OnnxCompError("--method chooses how an n:m --pattern is applied; it does not apply to --ratio")
    passes: list[Pass] = with_fusions([], fuse)
    if pattern is not None:
        nm: dict[str, Any] = {"pattern": pattern, "skip": list(skip)}
        if method is not None:
            nm["method"] = method
        if dense_layers is not None:
            nm["dense_layers"] = dense_layers
        passes.append(make_pass("sparsify_2to4", nm))
    else:
        options = {"ratio": ratio, "skip": list(skip), **dict(prune_options or {})}
        passes.append(make_pass("prune_channels", options))
    if quantize is not None:
        quant = quantize_options(
            weights=quantize, activations=activations or "none", granularity=granularity, skip=skip
        )
        passes.append(make_pass("quantize", quant))
    return passes


def decompose_passes(
    *,
    layers: DecomposeLayers = "conv",
    rank_rule: str | None = None,
    align: int | None = None,
    replay: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
    fuse: bool = True,
) -> list[Pass]:
    """Fusions (unless ``fuse=False``), then ``decompose_conv`` and/or ``decompose_matmul``.

    ``options`` are further pass options (each pass takes the ones it knows; the explicit keywords
    win); an option no selected pass knows is an error.
    """
    if layers not in DECOMPOSE_LAYERS:
        raise OnnxCompError(f"layers must be 'conv', 'matmul' or 'all', got {layers!r}")
    names = DECOMPOSE_LAYERS[layers]
    wanted: dict[str, Any] = dict(options or {})
    for key, value in (("rank_rule", rank_rule), ("align", align), ("record", replay)):
        if value is not None:
            wanted[key] = str(value) if key == "record" else value
    fields = {n: {f for f, _, _ in option_fields(get_pass(n).Options)} for n in names}
    valid: set[str] = set().union(*fields.values())
    unknown = sorted(set(wanted) - valid)
    if unknown:
        raise OnnxCompError(f"unknown decomposition option {unknown[0]!r}; valid options: {', '.join(sorted(valid))}")
    return with_fusions([make_pass(n, {k: v for k, v in wanted.items() if k in fields[n]}) for n in names], fuse)
