"""Throughput of the onnxcomp.formats codecs next to ml_dtypes' FP8 cast (issue 3, item 5).

Run from the repo root: ``python bench/formats.py``. For every format it encodes and decodes a
16M-element float32 array (randn times a scale suited to the format), takes the median of
``RUNS`` timings, and prints a markdown table with the ratio to ml_dtypes'
``x.astype(float8_e4m3fn)`` (encode) and ``.astype(float32)`` (decode), measured in the same run.
It also reports the peak extra memory of one encode, from tracemalloc, in units of the input size.
The table replaces the "## Numeric formats" section of bench/README.md.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxcomp.formats import (  # noqa: E402 - after the sys.path insert
    ElementFormat,
    IntegerFormat,
    MXFormat,
    available_formats,
    get_format,
)

N = 1 << 24  # 16M elements
RUNS = 5
README = REPO / "bench" / "README.md"
SECTION = "## Numeric formats"

# randn * scale: spans the interesting part of each format's range
DATA_SCALE = {
    "int8": 1.0, "uint8": 1.0, "int4": 1.0, "uint4": 1.0,
    "fp8_e4m3": 100.0, "fp8_e5m2": 1000.0, "hif8": 4.0,
    "fp4_e2m1": 2.0, "fp4_e1m2": 0.5, "mxfp8": 1.0, "mxfp4": 1.0,
}  # fmt: skip


def timed(fn: Callable[[], Any]) -> float:
    """Median wall time of RUNS calls (after one warm-up call that also builds tables)."""
    fn()
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def peak_extra(fn: Callable[[], Any], input_bytes: int) -> float:
    """Peak memory allocated during ``fn`` beyond its result, in units of ``input_bytes``."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    result = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    arrays = result if isinstance(result, tuple) else (result,)
    kept = sum(a.nbytes for a in arrays)
    return max(0, peak - kept) / input_bytes


def codec(name: str, x: np.ndarray) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(encode, decode) closures for format ``name`` on data ``x``."""
    fmt = get_format(name)
    if isinstance(fmt, IntegerFormat):
        scale, zp = fmt.compute_qparams(x.min(), x.max(), symmetric=fmt.signed)
        q = fmt.quantize(x, scale, zp)
        return (lambda: fmt.quantize(x, scale, zp)), (lambda: fmt.dequantize(q, scale, zp))
    if isinstance(fmt, MXFormat):
        codes, scales = fmt.quantize(x)
        return (lambda: fmt.quantize(x)), (lambda: fmt.dequantize(codes, scales))
    assert isinstance(fmt, ElementFormat)
    c = fmt.encode(x)
    return (lambda: fmt.encode(x)), (lambda: fmt.decode(c))


def main() -> str:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(N, dtype=np.float32)
    ref_x = base * np.float32(100.0)
    ref_codes = ref_x.astype(ml_dtypes.float8_e4m3fn)
    ref_enc = N / timed(lambda: ref_x.astype(ml_dtypes.float8_e4m3fn)) / 1e6
    ref_dec = N / timed(lambda: ref_codes.astype(np.float32)) / 1e6
    ref_x = ref_codes = None  # free them before the formats run (the lambdas have run)

    rows = [
        "| format | data | encode Melem/s | encode vs ml_dtypes | decode Melem/s | decode vs ml_dtypes "
        "| encode peak temp (x input) |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| ml_dtypes float8_e4m3fn (baseline) | randn*100 | {ref_enc:.0f} | 1.00 | {ref_dec:.0f} | 1.00 | - |",
    ]
    for name in available_formats():
        x = base * np.float32(DATA_SCALE[name])
        encode, decode = codec(name, x)
        enc = N / timed(encode) / 1e6
        dec = N / timed(decode) / 1e6
        mem = peak_extra(encode, x.nbytes)
        rows.append(
            f"| {name} | randn*{DATA_SCALE[name]:g} | {enc:.0f} | {enc / ref_enc:.2f} | {dec:.0f} "
            f"| {dec / ref_dec:.2f} | {mem:.2f} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    env = (
        f"numpy {np.__version__}, ml_dtypes {ml_dtypes.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}); {N // (1 << 20)}M float32 elements, "
        f"median of {RUNS} runs."
    )
    return table + "\n\n" + env


def write_section(body: str) -> None:
    """Replace (or append) the "## Numeric formats" section of bench/README.md."""
    section = (
        f"{SECTION}\n\n"
        "Codec throughput of `onnxcomp.formats` (encode = float32 -> codes, decode = codes -> float32;\n"
        "MX encode includes the block scales, integer encode is QuantizeLinear with per-tensor qparams).\n"
        "Regenerate with `python bench/formats.py`.\n\n"
        f"{body}\n"
    )
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\s*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    README.write_text(text)


if __name__ == "__main__":
    started = time.perf_counter()
    result = main()
    print()
    print(result)
    write_section(result)
    print(f"\nwrote {README.relative_to(REPO)} ({time.perf_counter() - started:.1f} s)")
