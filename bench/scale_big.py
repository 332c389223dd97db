"""Models over 2 GB through ``quantize`` in bounded memory, next to onnxruntime's quantizers.

Run from the repo root (needs ~3x the model size free on the temporary directory's disk)::

    .venv/bin/python bench/scale_big.py                 # 2.5 GB decoder (~30 min on a loaded 2-core machine)
    .venv/bin/python bench/scale_big.py --sizes 2.5GB 5GB
    .venv/bin/python bench/scale_big.py --no-readme     # print only

Model: ``models/decoder.py --size S`` (LLM-shaped decoder, float32, external data). Each run is a
fresh child process (``bench/_common.py``'s ``run_child``); peak RSS is its VmHWM, wall time the
parent's (interpreter start to exit). Rows:

- onnxcomp weight-only INT4 group:128 (``onnxcomp quantize --weights int4 --granularity group:128
  --activations none``; MatMulNBits; default MSE clipping search) and W8A8 (``--weights int8
  --activations int8``, histogram observer) on 4 batches of 2 x 64 tokens; the model is loaded
  *mapped* (weights read from the data file one initializer at a time, ``docs/scale.md``).
- onnxruntime's ``MatMulNBitsQuantizer`` (4 bits, block 128, symmetric, MatMul) on
  ``onnx.load`` of the model, and ``quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations, MatMul only, MinMax) on the same batches; both write external data.

The result replaces the "## Scale: models over 2 GB in bounded memory" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for entry in (str(REPO), str(REPO / "bench")):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from _common import child_main, environment_line, load_average, markdown_table, run_child, write_readme_section  # noqa: E402

from models.decoder import parse_size, shape_for_bytes, write_decoder  # noqa: E402

HEADING = "## Scale: models over 2 GB in bounded memory (issue 18)"
BATCHES, BATCH, SEQ = 4, 2, 64
RUNS = [
    ("onnxcomp", "weight-only INT4 g128", "onnxcomp_w4"),
    ("onnxruntime MatMulNBitsQuantizer", "weight-only INT4 g128", "ort_nbits"),
    ("onnxcomp", "W8A8 (histogram)", "onnxcomp_w8a8"),
    ("onnxruntime quantize_static", "W8A8 QDQ (MinMax)", "ort_static"),
]


def _batches(path: str) -> list[dict[str, np.ndarray]]:
    ids = np.load(path)["input_ids"]
    return [{"input_ids": ids[i : i + BATCH]} for i in range(0, len(ids), BATCH)]


def child_onnxcomp(task: dict[str, Any]) -> dict[str, Any]:
    from onnxcomp import api

    if task["kind"] == "onnxcomp_w4":
        options: dict[str, Any] = {"weights": "int4", "granularity": "group:128", "activations": "none"}
    else:
        options = {"weights": "int8", "activations": "int8", "calibration": _batches(task["calib"])}
    report = api.quantize(task["model"], task["out"], **options)
    return {"nodes": report.result("quantize").stats.get("nodes", 0)}


def child_ort_nbits(task: dict[str, Any]) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(task["model"]), bits=4, block_size=128, is_symmetric=True, op_types_to_quantize=("MatMul",)
    )
    quantizer.process()
    quantizer.model.save_model_to_file(task["out"], True)
    return {}


def child_ort_static(task: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter(_batches(task["calib"]))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(
        task["model"],
        task["out"],
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
    )
    return {}


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _peer_env() -> dict[str, str]:
    """ORT's MatMulNBitsQuantizer imports onnx_ir + sympy (bench/ptq.py installs them aside)."""
    from ptq import _peer_env as peers

    return peers()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["2.5GB"], help="model sizes (models/decoder.py --size)")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    rows: list[list[Any]] = []
    load_start = load_average()
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-scale-big-") as tmp:
            model = Path(tmp, "decoder.onnx")
            shape = shape_for_bytes(parse_size(size))
            write_decoder(model, shape, seed=0)
            model_bytes = _size(model)
            calib = Path(tmp, "calib.npz")
            np.savez(calib, input_ids=np.random.default_rng(0).integers(0, shape.vocab, (BATCHES * BATCH, SEQ)))
            for tool, config, kind in RUNS:
                out = Path(tmp, f"{kind}.onnx")
                env = _peer_env() if kind == "ort_nbits" else {}
                start = time.perf_counter()
                task = {"kind": kind, "model": str(model), "calib": str(calib), "out": str(out)}
                child = run_child(__file__, task, env=env, timeout=4 * 3600)
                wall = time.perf_counter() - start
                written = _size(out) if out.exists() else 0
                status = "ok" if child.ok else f"failed: {child.error}"
                rows.append(
                    [
                        f"{model_bytes / 2**30:.2f}",
                        tool,
                        config,
                        f"{wall:.0f}",
                        f"{child.peak_rss_mb / 1024:.2f}",
                        f"{child.peak_rss_mb * 2**20 / model_bytes:.2f}x",
                        f"{written / 2**30:.2f}" if written else "-",
                        status,
                    ]
                )
                print(rows[-1], flush=True)
                for leftover in Path(tmp).glob(f"{kind}.*"):
                    if leftover.is_file():
                        leftover.unlink()
                    else:
                        shutil.rmtree(leftover, ignore_errors=True)
    body = "\n\n".join(
        [
            "```sh\n.venv/bin/python bench/scale_big.py"
            + ("" if args.sizes == ["2.5GB"] else " --sizes " + " ".join(args.sizes))
            + "\n```",
            f"LLM-shaped decoders from `models/decoder.py --size` (float32, external data; hidden 2048, vocab 32000). "
            f"Each run in a fresh process: wall time from interpreter start to exit, peak RSS = its VmHWM. W8A8 "
            f"calibrates on {BATCHES} batches of {BATCH} x {SEQ} tokens. onnxcomp loads models with >= 1 GiB of "
            "external data *mapped* (`docs/scale.md`); its runs include the fusions, the SQNR report (W8A8), the "
            "kernel report and validating the output on onnxruntime.",
            markdown_table(
                ["model GiB", "tool", "configuration", "wall s", "peak RSS GiB", "RSS / model", "output GiB", "status"],
                rows,
                "lllrrrrl",
            ),
            f"1-minute load average {load_start} at the start, {load_average()} at the end (a shared 2-core machine: "
            "wall times are indicative; peak RSS is not affected by the load).",
            environment_line(["onnxruntime", "onnx", "numpy"]),
        ]
    )
    print(body)
    if not args.no_readme:
        write_readme_section(REPO / "bench" / "README.md", HEADING, body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        handlers = {"onnxcomp_w4": child_onnxcomp, "onnxcomp_w8a8": child_onnxcomp}
        handlers.update({"ort_nbits": child_ort_nbits, "ort_static": child_ort_static})
        child_main(handlers)
    else:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        main()
