"""Models under 2 GB (one .onnx file, weights inside it) through ``quantize``: mapped against in memory.

Run from the repo root::

    .venv/bin/python bench/midsize.py                  # a 700 MB decoder, 3 interleaved rounds
    .venv/bin/python bench/midsize.py --size 300MB --rounds 5 --no-readme

Model: ``models/decoder.py --size S`` (LLM-shaped decoder, float32) saved as ONE .onnx file, the
way exporters write models under 2 GB. Every row is a fresh child process (``bench/_common.py``'s
``run_child``): wall time from interpreter start to exit, peak RSS its VmHWM. Rows, run in
interleaved rounds (medians):

- onnxcomp, default: models with >= 256 MiB of weights are loaded *mapped* from the .onnx file
  itself (``onnxcomp/ir/inline_data.py``, docs/scale.md) and written back into one file;
- onnxcomp, ``--validate none``: the default run without onnx.checker, the reference run and the
  session over the output (what ORT's quantizers do not do either);
- onnxcomp, in memory: the same command with mapping switched off (what it did before: the model
  parsed whole, ``model_io.MAP_WEIGHTS_FROM_BYTES`` and ``execute.RUN_MAP_WEIGHTS_FROM_BYTES`` raised
  past the model);
- onnxruntime's quantizer at matched settings: ``MatMulNBitsQuantizer`` (4 bits, block 128,
  symmetric, round to nearest) against onnxcomp's ``--weight-observer minmax`` (round to nearest
  on the block amax), and ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
  MatMul, MinMax) against onnxcomp's W8A8 defaults on the same 4 batches of 2 x 64 tokens;
- ``onnxcomp fuse`` mapped and in memory (onnxruntime has no offline counterpart);
- onnxcomp's INT4 clipping search (the ``mse`` weight observer, its INT4 default: 41 candidate
  ranges per unit), with group:128 and with the defaults (per channel), unmatched: onnxruntime's
  quantizer rounds to nearest only.

onnxcomp's runs include what ORT's do not: its fusions, checking the input and output with
onnx.checker, a reference run, validating the output on onnxruntime (not with ``--validate
none``), the record JSON (every scale) and the recipe (the input's sha256); no SQNR report
(``reports=False``).

The result replaces the "## Mid-size models: weights mapped from the .onnx file" section of
bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from scale_big import BATCH, BATCHES, SEQ, _batches, _peer_env, _size, child_ort_static  # noqa: E402

from models.decoder import parse_size, shape_for_bytes, write_decoder  # noqa: E402

HEADING = "## Mid-size models: weights mapped from the .onnx file (issue 11 item 5)"

#: (setting, tool, kind); ``kind`` names the child's job
RUNS = [
    ("INT4 g128 weight-only, round to nearest", "onnxcomp (mapped, default)", "oc_w4"),
    ("INT4 g128 weight-only, round to nearest", "onnxcomp (mapped, --validate none)", "oc_w4_unchecked"),
    ("INT4 g128 weight-only, round to nearest", "onnxcomp (in memory)", "oc_w4_memory"),
    ("INT4 g128 weight-only, round to nearest", "onnxruntime MatMulNBitsQuantizer", "ort_nbits"),
    ("INT4 g128 weight-only, MSE clipping search", "onnxcomp (mapped, default)", "oc_w4_search"),
    (
        "INT4 per-channel weight-only, MSE clipping search",
        "onnxcomp (mapped, `--weights int4` defaults)",
        "oc_w4_default",
    ),
    ("W8A8 static", "onnxcomp (mapped, default)", "oc_w8a8"),
    ("W8A8 static", "onnxcomp (mapped, --validate none)", "oc_w8a8_unchecked"),
    ("W8A8 static", "onnxcomp (in memory)", "oc_w8a8_memory"),
    ("W8A8 static", "onnxruntime quantize_static (MinMax)", "ort_static"),
    ("fuse", "onnxcomp (mapped, default)", "oc_fuse"),
    ("fuse", "onnxcomp (in memory)", "oc_fuse_memory"),
]


def child_onnxcomp(task: dict[str, Any]) -> dict[str, Any]:
    from onnxcomp import api, execute, model_io

    kind = task["kind"]
    if kind.endswith("_memory"):  # never mapped: the whole model parsed in memory
        model_io.MAP_WEIGHTS_FROM_BYTES = execute.RUN_MAP_WEIGHTS_FROM_BYTES = 1 << 62
    if kind.startswith("oc_fuse"):
        api.fuse(task["model"], task["out"])
        return {}
    options: dict[str, Any] = {"weights": "int4", "activations": "none"}  # onnxcomp's INT4 defaults
    if kind.startswith("oc_w8a8"):
        options = {"weights": "int8", "activations": "int8", "calibration": _batches(task["calib"])}
    elif kind == "oc_w4_search":
        options["granularity"] = "group:128"
    elif kind != "oc_w4_default":  # the matched pair: round to nearest on the block amax
        options.update(granularity="group:128", weight_observer="minmax")
    validate = "none" if kind.endswith("_unchecked") else None  # None: the default, locate
    report = api.quantize(task["model"], task["out"], reports=False, validate=validate, **options)
    return {"nodes": report.result("quantize").stats.get("nodes", 0)}


def child_ort_nbits(task: dict[str, Any]) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(task["model"]), bits=4, block_size=128, is_symmetric=True, op_types_to_quantize=("MatMul",)
    )
    quantizer.process()
    quantizer.model.save_model_to_file(task["out"], False)
    return {}


def _model(directory: Path, size: str) -> tuple[Path, Path]:
    """The decoder of ``size`` as one .onnx file, and its calibration batches."""
    import onnx

    model, calib = directory / f"decoder_{size}.onnx", directory / f"calib_{size}.npz"
    shape = shape_for_bytes(parse_size(size))
    if not model.exists():
        external = directory / "external.onnx"
        write_decoder(external, shape, seed=0)
        proto = onnx.load(str(external))
        for tensor in proto.graph.initializer:  # as an exporter writes it
            tensor.ClearField("data_location")
        onnx.save(proto, str(model))
        del proto
        external.unlink()
        external.with_name("external.onnx.data").unlink()
    if not calib.exists():
        np.savez(calib, input_ids=np.random.default_rng(0).integers(0, shape.vocab, (BATCHES * BATCH, SEQ)))
    return model, calib


def _run(kind: str, model: Path, calib: Path, work: Path) -> dict[str, Any]:
    out = work / f"{kind}.onnx"
    load = load_average()
    start = time.perf_counter()
    task = {"kind": kind, "model": str(model), "calib": str(calib), "out": str(out)}
    child = run_child(__file__, task, env=_peer_env() if kind == "ort_nbits" else {}, timeout=3600)
    wall = time.perf_counter() - start
    written = _size(out) if out.exists() else 0
    for leftover in work.glob(f"{kind}.*"):
        leftover.unlink()
    return {"wall": wall, "peak_mb": child.peak_rss_mb, "out_mb": written / 2**20, "load": load, "ok": child.ok}


def _table(rows: dict[str, list[dict[str, Any]]], model_mb: float) -> str:
    cells = []
    for setting, tool, kind in RUNS:
        runs = rows.get(kind, [])
        ok = [r for r in runs if r["ok"]]
        if not ok:
            cells.append([setting, tool, "-", "-", "-", "-", "failed" if runs else "not run"])
            continue
        wall = statistics.median(r["wall"] for r in ok)
        peak = statistics.median(r["peak_mb"] for r in ok)
        cells.append(
            [setting, tool, f"{wall:.1f}", f"{peak:.0f}", f"{peak / model_mb:.2f}x", f"{ok[0]['out_mb']:.0f}", len(ok)]
        )
    headers = ["setting", "tool", "wall s (median)", "peak RSS MB", "RSS / model", "output MB", "runs"]
    return markdown_table(headers, cells, "llrrrrr")


def _span(loads: list[str]) -> str:
    values = sorted(float(v) for v in loads if v != "?")
    return f"{values[0]:.1f}-{values[-1]:.1f}" if values else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="700MB", help="model size (models/decoder.py --size), default 700MB")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--only", nargs="+", choices=[k for _, _, k in RUNS], help="run only these rows")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    kinds = args.only or [k for _, _, k in RUNS]
    rows: dict[str, list[dict[str, Any]]] = {}
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench-midsize-") as tmp:
        model, calib = _model(Path(tmp), args.size)
        model_mb = model.stat().st_size / 2**20
        for round_ in range(args.rounds):
            for kind in kinds:
                row = _run(kind, model, calib, Path(tmp))
                loads.append(row["load"])
                rows.setdefault(kind, []).append(row)
                print(round_ + 1, kind, json.dumps(row), flush=True)
    body = "\n\n".join(
        [
            f"```sh\n.venv/bin/python bench/midsize.py --size {args.size} --rounds {args.rounds}\n```",
            f"An LLM-shaped decoder of {model_mb:.0f} MB (`models/decoder.py --size {args.size}`) saved as one .onnx "
            f"file. Each run a fresh process, {args.rounds} interleaved rounds, medians; 1-minute load average "
            f"{_span(loads)} over the runs (a shared 2-core machine: wall times are indicative, peak RSS "
            "is not affected by the load). What each row runs: the module docstring of bench/midsize.py. "
            "A mapped run under 1 GiB reads its written output back in at the end (the API returns an ordinary "
            "proto, `RunReport.model`): that is the peak of `fuse`, whose output is as big as its input.",
            _table(rows, model_mb),
            environment_line(["onnxruntime", "onnx", "numpy"]),
        ]
    )
    print(body)
    if not args.no_readme:
        write_readme_section(REPO / "bench" / "README.md", HEADING, body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        handlers = {k: child_onnxcomp for _, _, k in RUNS if k.startswith("oc_")}
        handlers.update({"ort_nbits": child_ort_nbits, "ort_static": child_ort_static})
        child_main(handlers)
    else:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        main()
