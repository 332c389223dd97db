"""Which ``quantize`` options quantization-aware training starts from, and which it declines."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from onnxcomp.errors import ConfigError

#: quantize options QAT does not start from (their plain value): they insert nodes (SmoothQuant's and AWQ's
#: Mul by 1/s where no neighbour absorbs it) the float model lacks, or search (accuracy_target)
UNSUPPORTED_OPTIONS = {
    "smoothquant": None,
    "weight_algorithm": "rtn",
    "accuracy_target": None,
    "embeddings": "none",
}
#: ... and the values it starts from: the float values the PTQ run quantized (``build._start_from``)
STARTS_FROM_PTQ = {"weight_algorithm": ("gptq",), "bias_correction": ("full", "fast"), "equalize": (True,)}


def check_options(options: Mapping[str, Any]) -> None:
    for key, plain in UNSUPPORTED_OPTIONS.items():
        if key in options and options[key] not in (plain, None, False, *STARTS_FROM_PTQ.get(key, ())):
            raise ConfigError(
                f"quantization-aware training starts from round-to-nearest, GPTQ, bias-corrected or equalized PTQ: "
                f"drop {key}={options[key]!r} (SmoothQuant / AWQ may insert nodes the float model lacks)"
            )


def starts_from_ptq(options: Mapping[str, Any]) -> bool:
    """Whether the PTQ run changes float values the module must start from (GPTQ, bias correction, equalization)."""
    return any(options.get(key) in values for key, values in STARTS_FROM_PTQ.items())
