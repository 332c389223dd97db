"""Low-bit weight storage that stock onnxruntime runs (``docs/onnxruntime.md``): the numerics.

Each format is re-encoded exactly into something ORT's CPU provider executes:

============  ==============================================  =====================================
format        stored as                                       exact because
============  ==============================================  =====================================
fp4_e1m2      INT4 codes 4*v, DequantizeLinear(scale / 4)     every E1M2 value * 4 is an integer -7..7
fp4_e2m1      INT8 codes 2*v, DequantizeLinear(scale / 2)     every E2M1 value * 2 is an integer
mxfp4         INT8 codes 2*v, blocked DQ(2^X / 2, block 32)   same, with power-of-two block scales
mxfp8         FLOAT8E4M3FN codes, blocked DQ(2^X, block 32)   float32 2^X is exact (E8M0 scales are
                                                              rejected by ORT)
hif8          UINT8 codes -> Cast -> Gather(256 values) * s   a table holds every HiF8 value
============  ==============================================  =====================================

Options for E2M1 (fp4_e2m1, mxfp4): ``uint4_lut`` stores real 4-bit codes and maps them to the
INT8 codes with a 16-entry Gather (ORT folds it at load: 4 bits on disk, 8 in RAM);
``float4e2m1`` writes the spec-faithful FLOAT4E2M1 DequantizeLinear (opset 23), which ONNX
defines but ORT's CPU provider cannot run (check it with ``onnx.reference``). The graph writing
of these storages is in :mod:`onnxcomp.quant.emit`.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.errors import ConfigError
from onnxcomp.formats import ElementFormat, MXFormat, get_format
from onnxcomp.ir import WeightLayout
from onnxcomp.quant.qweight import QuantizedWeight, storage_array, unit_view
from onnxcomp.quant.spec import TensorSpec

FP4_STORAGES = ("int8", "uint4_lut", "float4e2m1")
#: The integer each element format's values are multiplied by to become exact integer codes.
INT_FACTOR = {"fp4_e1m2": 4, "fp4_e2m1": 2}


def lowbit_storage(
    fmt: ElementFormat, codes: np.ndarray, scale: np.ndarray, fp4_storage: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """(stored codes, stored scale, stored zero point or None, storage kind) for element codes.

    Kinds: ``dq`` (DequantizeLinear of the stored codes), ``lut`` (HiF8: Cast + Gather + Mul),
    ``lut_dq`` (uint4 codes -> Gather(int8 table) -> DequantizeLinear).
    """
    import ml_dtypes

    name = fmt.name
    if name == "hif8":
        return np.asarray(codes, np.uint8), scale, None, "lut"
    if name in INT_FACTOR:
        factor = INT_FACTOR[name]
        ints = np.rint(fmt.decode(codes) * factor).astype(np.int8)
        if name == "fp4_e1m2":
            return ints.astype(ml_dtypes.int4), scale / np.float32(factor), np.zeros(scale.shape, ml_dtypes.int4), "dq"
        if fp4_storage == "int8":
            return ints, scale / np.float32(factor), np.zeros(scale.shape, np.int8), "dq"
        if fp4_storage == "uint4_lut":
            return (
                np.asarray(codes, np.uint8).astype(ml_dtypes.uint4),
                scale / np.float32(factor),
                np.zeros(scale.shape, np.int8),
                "lut_dq",
            )
        if fp4_storage == "float4e2m1":
            return (
                fmt.decode(codes).astype(ml_dtypes.float4_e2m1fn),
                scale,
                np.zeros(scale.shape, ml_dtypes.float4_e2m1fn),
                "dq",
            )
        raise ConfigError(f"fp4_storage {fp4_storage!r} unknown; use one of {', '.join(FP4_STORAGES)}")
    return storage_array(codes, fmt), scale, storage_array(np.zeros(scale.shape, np.uint8), fmt), "dq"


def stored_as(fmt_name: str, kind: str, codes: np.ndarray) -> str:
    """Human description of the storage, for the record."""
    dtype = {"int4": "int4", "uint4": "uint4", "float4_e2m1fn": "float4e2m1", "float8_e4m3fn": "float8e4m3fn"}.get(
        codes.dtype.name, codes.dtype.name
    )
    mx = get_format(fmt_name) if fmt_name.startswith("mx") else None
    factor = INT_FACTOR.get(fmt_name) or INT_FACTOR.get(mx.element.name if isinstance(mx, MXFormat) else "", 0)
    if kind == "lut":
        return f"uint8 codes + 256-entry table ({fmt_name})"
    if kind == "dq2":
        return f"{dtype} ({fmt_name} values x{factor}) with float8e4m3fn group scales under float32 channel scales"
    if kind == "lut_dq":
        return f"uint4 codes + 16-entry table -> int8 x{factor} ({fmt_name})"
    if factor and dtype in ("int8", "int4"):
        return f"{dtype} ({fmt_name} values x{factor})"
    return dtype


def quantize_mx_weight(
    w: np.ndarray, fmt: MXFormat, layout: WeightLayout, spec: TensorSpec, fp4_storage: str, name: str
) -> QuantizedWeight:
    """MX blocks of 32 along the reduction axis; the E8M0 scales become float32 2^X (exact)."""
    r = layout.reduction_axis
    codes, scale_bytes = fmt.quantize(w, axis=r, name=name)
    k = w.shape[r]
    codes = np.take(codes, np.arange(k), axis=r)  # drop the zero padding
    x = scale_bytes.astype(np.int32) - 127
    scale = np.ldexp(np.float32(1), x).astype(np.float32)
    elem = fmt.element
    values = elem.decode(codes)
    deq = (values * np.repeat(scale, fmt.block_size, axis=r).take(np.arange(k), axis=r)).astype(np.float32)
    stored, s, zp, kind = lowbit_storage(elem, codes, scale, fp4_storage)
    return QuantizedWeight(stored, np.asarray(s, np.float32), zp, r, fmt.block_size, deq, spec, kind)


def quantize_two_level(
    w: np.ndarray, spec: TensorSpec, layout: WeightLayout, fp4_storage: str = "int8"
) -> QuantizedWeight:
    """FP4 weights with FP8 group scales under a per-channel float32 scale (two levels).

    s_c = amax_c / (448 * e4max); group scale g = amax_g / (e4max * s_c), stored as FP8 E4M3 (RNE);
    element codes = E2M1/E1M2(w / (s_c * g8)); w' = value * fl(s_c * g8). Emitted as
    DQ(fp8 group-scale codes, s_c / f) -> blocked DQ(int codes f*v): both exact (f = 2 or 4).
    """
    import ml_dtypes

    if fp4_storage != "int8":
        raise ConfigError(
            f"fp4_storage {fp4_storage!r} cannot be combined with two-level scales (scale_format); use int8"
        )
    # Callers use two levels only when spec.scale_format is set, and spec validation allows it only
    # for fp4_e2m1/fp4_e1m2 elements with fp8_e4m3 scales: both element formats.
    assert spec.scale_format is not None
    elem = get_format(spec.dtype)
    fp8 = get_format(spec.scale_format)
    assert isinstance(elem, ElementFormat) and isinstance(fp8, ElementFormat)
    factor = INT_FACTOR[elem.name]
    view, axes, padded = unit_view(w, spec, layout)
    r, c = layout.reduction_axis, layout.channel_axis
    vc = c if c < r else c + 1  # channel axis inside the grouped view
    absv = np.abs(view)
    amax_c = absv.max(axis=tuple(a for a in range(view.ndim) if a != vc), keepdims=True).astype(np.float64)
    s_c = np.where(amax_c > 0, amax_c / (fp8.max_value * elem.max_value), 1.0).astype(np.float32)
    amax_g = absv.max(axis=axes, keepdims=True).astype(np.float64)
    g = (amax_g / (elem.max_value * s_c.astype(np.float64))).astype(np.float32)
    g_codes = fp8.encode(g)
    g8 = fp8.decode(g_codes)
    eff = np.multiply(s_c, g8, dtype=np.float32)
    safe = np.where(eff > 0, eff, np.float32(1))
    codes = elem.encode(np.divide(view, safe, dtype=np.float32))
    codes = np.where(eff > 0, codes, 0).astype(np.uint8)
    deq = np.multiply(elem.decode(codes), eff, dtype=np.float32)
    ints = np.rint(elem.decode(codes) * factor).astype(np.int8)
    # back to the weight's layout (drop the group split and padding)
    merged = w.shape[:r] + (padded,) + w.shape[r + 1 :]
    keep = [slice(None)] * w.ndim
    keep[r] = slice(0, w.shape[r])
    ints = ints.reshape(merged)[tuple(keep)]
    deq = deq.reshape(merged)[tuple(keep)]
    g_codes = np.squeeze(g_codes, axis=r + 1)
    stored = ints.astype(ml_dtypes.int4) if elem.name == "fp4_e1m2" else ints
    zero = np.zeros(g_codes.shape, stored.dtype)
    return QuantizedWeight(
        stored,
        np.asarray(s_c.reshape(-1) / np.float32(factor), np.float32),
        zero,
        r,
        spec.granularity.size,
        np.ascontiguousarray(deq),
        spec,
        "dq2",
        group_scale_codes=g_codes.view(ml_dtypes.float8_e4m3fn),
    )
