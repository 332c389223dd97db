"""``--target ascend-qdq``: a standard QDQ model within AMCT's ``convert_qat_model`` constraints.

INT8 activations per tensor (asymmetric, signed: AscendQuant's grid), INT8 symmetric weights
per channel for Conv / ConvTranspose and per tensor for Gemm / MatMul, every quantizable node
quantized (no onnxruntime speed placement), float32 model inputs (docs/ascend.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from onnxcomp import ir
from onnxcomp.errors import ConfigError

_PER_TENSOR_OPS = ("Gemm", "MatMul")


def _dtype(spec: Any, default: str) -> str:
    if isinstance(spec, str):
        return spec.lower()
    return str(dict(spec).get("dtype", default)).lower()


def _int8(spec: Any, role: str, extra: dict[str, Any]) -> dict[str, Any]:
    dtype = _dtype(spec, "int8")
    if dtype not in ("int8", "uint8"):
        raise ConfigError(
            f"--target ascend-qdq: {role} {dtype!r}: AMCT's convert_qat_model takes INT8 {role} only; "
            "use --target ascend for INT16/INT4 or --target ort for other formats"
        )
    table = {} if isinstance(spec, str) else dict(spec)
    return {**table, "dtype": "int8", **extra}


def ascend_qdq_options(options: Any) -> Any:
    """The quantize pass options with AMCT's convert_qat_model constraints applied."""
    op_types = dict(options.op_types)
    for op in _PER_TENSOR_OPS:
        entry = dict(op_types.get(op, {}))
        entry["weights"] = _int8(entry.get("weights", options.weights), "weights", {"granularity": "tensor"})
        op_types[op] = entry
    act = options.activations
    act_extra = {"symmetric": False} if isinstance(act, str) else {}
    return replace(
        options,
        weights=_int8(options.weights, "weights", {"symmetric": True}),
        activations=_int8(act, "activations", act_extra),
        op_types=op_types,
        placement="all",
        weight_only_format="dq",
    )


def check_float_inputs(graph: ir.Graph) -> None:
    """convert_qat_model takes float32 model inputs only: a one-line error naming the first other one."""
    for tensor in graph.inputs:
        if tensor.dtype is not None and np.dtype(tensor.dtype) != np.float32:
            raise ConfigError(
                f"--target ascend-qdq: model input {tensor.name!r} is {np.dtype(tensor.dtype)}; AMCT's "
                "convert_qat_model needs float32 model inputs (use --target ascend, which has no such limit)"
            )
