"""The quant record: what was quantized, how, and with which parameters (``OUT.quant_record.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from onnxcomp.analysis.sparsity import weight_sparsity  # zeros survive quantization exactly (q = zero point)
from onnxcomp.quant.qweight import QuantizedWeight


def attach_migrated(record: list[dict[str, Any]], migrated: Mapping[str, list[dict[str, Any]]]) -> None:
    """Each quantized node's record entry gets what equalization / SmoothQuant / AWQ did to it
    (entries name a ``node``, or an equalized pair ``first`` / ``second``)."""
    by_node = {e.get("node"): e for e in record}
    for algorithm, entries in migrated.items():
        for item in entries:
            for name in [item["node"]] if "node" in item else [item["first"], item["second"]]:
                if name in by_node:
                    by_node[name].setdefault("algorithms", {})[algorithm] = item


def _tolist(a: np.ndarray) -> Any:
    return (
        np.asarray(a, dtype=np.float64).tolist()
        if np.asarray(a).dtype.kind == "f"
        else np.asarray(a).astype(np.int64).tolist()
    )


def _zero_pattern(qw: QuantizedWeight) -> np.ndarray:
    """What the record counts zeros on: the one-byte integer codes when their zero point is 0 (a
    weight is 0 exactly where its code equals the zero point), else the dequantized floats."""
    codes, zp = qw.codes, qw.zero_point
    integer = codes.dtype.kind in "iu" or codes.dtype.name in ("int4", "uint4")
    if qw.storage != "dq" or not integer or codes.dtype.itemsize != 1 or codes.shape != qw.dequantized.shape:
        return qw.dequantized
    if zp is None or np.any(np.asarray(zp).view(np.uint8) != 0):
        return qw.dequantized
    return codes.view(np.uint8)


def weight_record(name: str, qw: QuantizedWeight, stored_as: str) -> dict[str, Any]:
    spec = qw.spec
    zp = qw.zero_point if qw.zero_point is not None else np.zeros(np.shape(qw.scale), np.int8)
    zp_values = zp.astype(np.float32) if zp.dtype.kind not in "iu" else zp
    return {
        "tensor": name,
        "dtype": spec.dtype,
        "granularity": str(spec.granularity),
        "symmetric": spec.symmetric,
        "observer": spec.observer,
        "axis": qw.axis,
        "block_size": qw.block_size,
        "stored_as": stored_as,
        "shape": list(qw.dequantized.shape),
        "scale": _tolist(qw.scale),
        "zero_point": _tolist(zp_values),
        "sparsity": weight_sparsity(_zero_pattern(qw)),
        **({"algorithm": qw.algorithm} if qw.algorithm else {}),
    }
