"""Models over 2 GB through ``quantize`` in bounded memory, next to onnxruntime's quantizers.

Run from the repo root (needs ~3x the model size free on the temporary directory's disk)::

    .venv/bin/python bench/scale_big.py                 # 2.5 GB decoder (~30 min on a loaded 2-core machine)
    .venv/bin/python bench/scale_big.py --sizes 2.5GB 5GB
    .venv/bin/python bench/scale_big.py --no-readme     # print only
    .venv/bin/python bench/scale_big.py --sizes 5GB --only ort_nbits ort_static --rows rows.json --model-dir DIR
    .venv/bin/python bench/scale_big.py --rows rows.json --report   # the README section from the kept rows

``--only`` runs some rows (names below), ``--rows FILE`` keeps every row measured so far in a JSON
file (a rerun of a row replaces it) and the table shows them all, ``--model-dir`` keeps the
generated models there between invocations (one multi-GB job at a time on a shared machine).

Model: ``models/decoder.py --size S`` (LLM-shaped decoder, float32, external data). Each run is a
fresh child process (``bench/_common.py``'s ``run_child``); peak RSS is its VmHWM, wall time the
parent's (interpreter start to exit). Rows:

- onnxcomp weight-only INT4 group:128 (``onnxcomp quantize --weights int4 --granularity group:128
  --activations none``; MatMulNBits; default MSE clipping search) and W8A8 (``--weights int8
  --activations int8``, histogram observer) on 4 batches of 2 x 64 tokens; the model is loaded
  *mapped* (weights read from the data file one initializer at a time, ``docs/scale.md``).
- onnxcomp ``fuse`` (``onnxcomp_fuse``), ``sparsify --pattern 2:4`` (magnitude, no data:
  ``onnxcomp_sparsify``) and ``decompose --layers matmul`` (``onnxcomp_decompose``), also mapped.
- onnxruntime's ``MatMulNBitsQuantizer`` (4 bits, block 128, symmetric, MatMul) on
  ``onnx.load`` of the model, and ``quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations, MatMul only, MinMax) on the same batches; both write external data.

The result replaces the "## Scale: models over 2 GB in bounded memory" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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
    ("onnxcomp", "inspect", "onnxcomp_inspect"),
    ("onnxcomp", "fuse", "onnxcomp_fuse"),
    ("onnxcomp", "sparsify 2:4 (magnitude)", "onnxcomp_sparsify"),
    ("onnxcomp", "decompose MatMul (auto rank)", "onnxcomp_decompose"),
]


def _batches(path: str) -> list[dict[str, np.ndarray]]:
    ids = np.load(path)["input_ids"]
    return [{"input_ids": ids[i : i + BATCH]} for i in range(0, len(ids), BATCH)]


def child_onnxcomp(task: dict[str, Any]) -> dict[str, Any]:
    from onnxcomp import api

    kind = task["kind"]
    if kind == "onnxcomp_inspect":  # what `onnxcomp inspect` runs (no output file)
        from onnxcomp.cli.main import main as cli_main

        with contextlib.redirect_stdout(io.StringIO()):
            cli_main(["inspect", task["model"]])
        return {}
    if kind == "onnxcomp_fuse":
        api.fuse(task["model"], task["out"])
        return {}
    if kind == "onnxcomp_sparsify":
        api.sparsify(task["model"], task["out"], pattern="2:4", method="magnitude")
        return {}
    if kind == "onnxcomp_decompose":
        api.decompose(task["model"], task["out"], layers="matmul")
        return {}
    if kind == "onnxcomp_w4":
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


def _model(directory: Path, size: str) -> tuple[Path, Path, int]:
    """The decoder of ``size`` and its calibration batches in ``directory`` (written when missing)."""
    model = directory / f"decoder_{size}.onnx"
    calib = directory / f"calib_{size}.npz"
    shape = shape_for_bytes(parse_size(size))
    if not model.exists() or not model.with_name(model.name + ".data").exists():
        write_decoder(model, shape, seed=0)
    if not calib.exists():
        np.savez(calib, input_ids=np.random.default_rng(0).integers(0, shape.vocab, (BATCHES * BATCH, SEQ)))
    return model, calib, _size(model)


def _measure(kind: str, model: Path, calib: Path, model_bytes: int, work: Path) -> dict[str, Any]:
    tool, config = next((t, c) for t, c, k in RUNS if k == kind)
    out = work / f"{kind}.onnx"
    env = _peer_env() if kind == "ort_nbits" else {}
    load = load_average()
    start = time.perf_counter()
    task = {"kind": kind, "model": str(model), "calib": str(calib), "out": str(out)}
    child = run_child(__file__, task, env=env, timeout=4 * 3600)
    wall = time.perf_counter() - start
    written = _size(out) if out.exists() else 0
    for leftover in work.glob(f"{kind}.*"):
        if leftover.is_file():
            leftover.unlink()
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    return {
        "model_gib": round(model_bytes / 2**30, 2),
        "tool": tool,
        "config": config,
        "kind": kind,
        "wall_s": round(wall),
        "peak_gib": round(child.peak_rss_mb / 1024, 2),
        "ratio": round(child.peak_rss_mb * 2**20 / model_bytes, 2),
        "output_gib": round(written / 2**30, 2) if written else None,
        "load": load,
        "status": "ok" if child.ok else f"failed: {child.error}",
    }


def _table(rows: list[dict[str, Any]]) -> str:
    order = {kind: i for i, (_, _, kind) in enumerate(RUNS)}
    rows = sorted(rows, key=lambda r: (r["model_gib"], order.get(r["kind"], 99)))
    cells = [
        [
            f"{r['model_gib']:.2f}",
            r["tool"],
            r["config"],
            r["wall_s"],
            f"{r['peak_gib']:.2f}",
            f"{r['ratio']:.2f}x",
            "-" if r["output_gib"] is None else f"{r['output_gib']:.2f}",
            r["load"],
            r["status"],
        ]
        for r in rows
    ]
    headers = ["model GiB", "tool", "configuration", "wall s", "peak RSS GiB", "RSS / model", "output GiB"]
    return markdown_table(headers + ["load", "status"], cells, "lllrrrrrl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["2.5GB"], help="model sizes (models/decoder.py --size)")
    parser.add_argument("--only", nargs="+", choices=[k for _, _, k in RUNS], help="run only these rows")
    parser.add_argument("--rows", type=Path, help="JSON file keeping the rows of earlier invocations")
    parser.add_argument("--model-dir", type=Path, help="keep the generated models here (default: a temp dir)")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    parser.add_argument("--report", action="store_true", help="measure nothing: the table of --rows")
    args = parser.parse_args()
    kept: list[dict[str, Any]] = json.loads(args.rows.read_text()) if args.rows and args.rows.exists() else []
    kinds = args.only or [k for _, _, k in RUNS]
    for size in [] if args.report else args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-scale-big-") as tmp:
            model, calib, model_bytes = _model(args.model_dir or Path(tmp), size)
            for kind in kinds:
                row = _measure(kind, model, calib, model_bytes, Path(tmp))
                print(row, flush=True)
                kept = [r for r in kept if (r["model_gib"], r["kind"]) != (row["model_gib"], kind)] + [row]
                if args.rows:
                    args.rows.write_text(json.dumps(kept, indent=1))
    body = "\n\n".join(
        [
            "```sh\n.venv/bin/python bench/scale_big.py --sizes 2.5GB 5GB\n```",
            f"LLM-shaped decoders from `models/decoder.py --size` (float32, external data; hidden 2048, vocab 32000). "
            f"Each run in a fresh process: wall time from interpreter start to exit, peak RSS = its VmHWM (mapped "
            f"file pages the process touched count, as they do for onnxruntime's own runs). W8A8 calibrates on "
            f"{BATCHES} batches of {BATCH} x {SEQ} tokens. onnxcomp loads models with >= 256 MiB of weights "
            "*mapped* (`docs/scale.md`); its quantize runs include the fusions, the SQNR report (W8A8), the kernel "
            "report and validating the written output on onnxruntime. 'load' = the 1-minute load average when the "
            "row started (a shared 2-core machine: wall times are indicative; peak RSS is not affected by the load).",
            _table(kept),
            environment_line(["onnxruntime", "onnx", "numpy"]),
        ]
    )
    print(body)
    if not args.no_readme:
        write_readme_section(REPO / "bench" / "README.md", HEADING, body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        handlers = {k: child_onnxcomp for _, _, k in RUNS if k.startswith("onnxcomp")}
        handlers.update({"ort_nbits": child_ort_nbits, "ort_static": child_ort_static})
        child_main(handlers)
    else:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        main()
