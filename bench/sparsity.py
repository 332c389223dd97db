"""Sparsity benchmark (issue 6, item 6): accuracy, MACs, size and ORT CPU latency of sparse models.

Run from the repo root: ``python bench/sparsity.py`` (``--no-write`` only prints; ``--quick``
uses fewer samples; ``--seeds 1,2,3,4,5`` runs only the 2:4 SparseGPT study on ppocr_cls over
those calibration seeds, each mask rule against magnitude, into the "## 2:4 SparseGPT across
calibration seeds" section). For each model it compresses the fp32 model (after the deployment fusions)
with ``onnxcomp.api.sparsify`` / ``quantize`` in these settings:

* INT8 alone (W8 per-channel, A8 per-tensor static) for reference;
* 2:4 structured sparsity, and 2:4 followed by INT8;
* channel pruning of 10 / 25 / 50 % of every prunable layer's channels (weight L2 norm), without
  and with least-squares reconstruction of the consumers on calibration data;
* 25 % pruning with reconstruction and kept counts rounded up to a multiple of 16, per layer and
  spread over the whole model (``scope = "global"``);
* 25 % pruning with reconstruction followed by INT8 (W8A8) or INT4 weights (W4, per channel,
  float activations).

Models: the digits demo CNN (``models/digits_cnn.onnx``; held-out top-1 on 540 digits, 128
calibration samples) and the PP-OCR text-orientation classifier ``ppocr_cls`` (``rapidocr``
wheel; a MobileNetV3 with residual adds, depthwise convs and SE blocks; top-1 on 512 rendered
text lines, half of them flipped 180 degrees, 64 other lines for calibration). Accuracy is top-1 in
percent; cosine is that of the model's outputs with the fp32 model's on the evaluation set.
MACs are counted by ``onnxcomp.macs`` for one sample (16x16 digit, 3x48x192 line); size is
the serialized model. Latency is onnxruntime CPU (ORT_ENABLE_ALL, 1 thread) of a batch of 256
digits or 16 lines, all models of a table timed round-robin (median and min of the runs; the min
is the steadier figure on a loaded machine). The tables replace the "## Sparsity" section of
bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _common as common  # noqa: E402 - after the sys.path insert

from models.fetch import fetch, make_inputs  # noqa: E402
from onnxcomp.analysis.metrics import accuracy, cosine, predict  # noqa: E402
from onnxcomp.api import compress as run_passes  # noqa: E402
from onnxcomp.api import fuse, quantize, sparsify  # noqa: E402
from onnxcomp.framework.registry import make_pass  # noqa: E402
from onnxcomp.model_io import load_model  # noqa: E402
from onnxcomp.sparsity.report import model_figures  # noqa: E402

README = REPO / "bench" / "README.md"
SECTION = "## Sparsity"
SEEDS_SECTION = "## 2:4 SparseGPT across calibration seeds"
Feeds = Mapping[str, np.ndarray]


@dataclass
class Case:
    name: str
    title: str
    model: onnx.ModelProto  # fused fp32
    evaluate: Feeds
    labels: np.ndarray
    calibration: Feeds
    latency_feeds: Feeds
    input_shapes: dict[str, list[int]]


@dataclass
class Row:
    setting: str
    model: onnx.ModelProto
    seconds: float
    accuracy: float = float("nan")
    cosine: float = float("nan")
    figures: dict[str, Any] | None = None
    latency: tuple[float, float] = (float("nan"), float("nan"))


def digits(quick: bool) -> Case:
    held = np.load(REPO / "models" / "digits_heldout.npz")
    calib = np.load(REPO / "models" / "digits_calib.npz")["input"]
    n = 270 if quick else len(held["label"])
    model = fuse(REPO / "models" / "digits_cnn.onnx").model
    return Case(
        "digits",
        "Digits demo CNN (`models/digits_cnn.onnx`)",
        model,
        {"input": held["input"][:n]},
        held["label"][:n],
        {"input": calib},
        {"input": held["input"][:256]},
        {"input": [1, 1, 16, 16]},
    )


def ppocr_cls(quick: bool) -> Case:
    n = 128 if quick else 512
    x, meta = make_inputs("ppocr_cls", n=n, seed=1, return_meta=True)
    calib = make_inputs("ppocr_cls", n=32 if quick else 64, seed=2)
    model = fuse(load_model(fetch("ppocr_cls"))).model
    return Case(
        "ppocr_cls",
        "PP-OCR text-orientation classifier (`ppocr_cls`, MobileNetV3, rapidocr 3.10.0)",
        model,
        x,
        meta["labels"],
        calib,
        {"x": x["x"][:16]},
        {"x": [1, 3, 48, 192]},
    )


W8A8 = {"quantize": "int8", "activations": "int8"}
SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("INT8 (W8A8)", {"int8_only": True}),
    ("2:4", {"pattern": "2:4"}),
    ("2:4 + INT8 (W8A8)", {"pattern": "2:4", **W8A8}),
    *[
        (f"prune {int(r * 100)}%{' + reconstruction' if rec else ''}", {"ratio": r, "refit": rec})
        for r in (0.10, 0.25, 0.50)
        for rec in (False, True)
    ],
    ("prune 25% + reconstruction, round_to 16", {"ratio": 0.25, "refit": True, "round_to": 16}),
    (
        "prune 25% global + reconstruction, round_to 16",
        {"ratio": 0.25, "refit": True, "round_to": 16, "scope": "global"},
    ),
    ("prune 25% + reconstruction + INT8 (W8A8)", {"ratio": 0.25, "refit": True, **W8A8}),
    ("prune 25% + reconstruction + INT4 (W4)", {"ratio": 0.25, "refit": True, "quantize": "int4"}),
]


def compress(case: Case, settings: dict[str, Any]) -> tuple[onnx.ModelProto, float]:
    start = time.perf_counter()
    if settings.get("int8_only"):
        model = quantize(
            case.model,
            calibration=case.calibration,
            weights="int8",
            granularity="channel",
            activations="int8",
            fuse=False,
        ).model
    else:
        model = sparsify(case.model, calibration=case.calibration, fuse=False, batch_size=16, **settings).model
    return model, time.perf_counter() - start


def measure(case: Case, runs: int) -> list[Row]:
    reference = predict(case.model, case.evaluate, batch=64)
    rows = [Row("fp32 (fused)", case.model, 0.0)]
    for setting, options in SETTINGS:
        model, seconds = compress(case, options)
        rows.append(Row(setting, model, seconds))
        print(f"  {case.name}: {setting} ({seconds:.1f} s)", flush=True)
    for row in rows:
        out = predict(row.model, case.evaluate, batch=64)
        row.accuracy, row.cosine = accuracy(out, case.labels), cosine(reference, out)
        row.figures = model_figures(row.model, case.input_shapes)
    timings = interleaved(rows, case.latency_feeds, runs)
    for row, timing in zip(rows, timings, strict=True):
        row.latency = timing
    return rows


def interleaved(rows: list[Row], feeds: Feeds, runs: int) -> list[tuple[float, float]]:
    """(median, min) ms of one run of each model, timed round-robin on one thread."""
    sessions = [common.ort_session(r.model, threads=1) for r in rows]
    for session in sessions:
        for _ in range(3):
            session.run(None, dict(feeds))
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(runs):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, dict(feeds))
            times[i].append((time.perf_counter() - start) * 1e3)
    return [(statistics.median(t), min(t)) for t in times]


def table(rows: list[Row]) -> str:
    base = rows[0]
    assert base.figures is not None

    def rel(key: str, row: Row) -> str:
        assert row.figures is not None
        value, ref = row.figures[key], base.figures[key]
        if value is None or not ref:
            return "-"
        text = common.fmt(value / 1e3, 1) + "k" if key != "bytes" else common.fmt(value / 1024, 1)
        return text if row is base else f"{text} ({value / ref - 1:+.0%})"

    body = [
        [
            r.setting,
            common.fmt(r.accuracy, 2),
            f"{r.cosine:.4f}",
            rel("params", r),
            rel("macs", r),
            rel("bytes", r),
            f"{r.latency[0]:.2f} / {r.latency[1]:.2f}",
            common.fmt(r.seconds, 1) if r is not base else "-",
        ]
        for r in rows
    ]
    headers = [
        "setting",
        "top-1 %",
        "cosine vs fp32",
        "params",
        "MACs",
        "size KiB",
        "latency ms (median / min)",
        "compress s",
    ]
    return common.markdown_table(headers, body, "lrrrrrrr")


def seed_study(seeds: list[int], held_out: int, calib_samples: int) -> str:
    """2:4 on ppocr_cls by each SparseGPT mask rule (and magnitude) for each calibration seed:
    top-1 on ``held_out`` lines (seed 99) relative to fp32's, as a markdown table."""
    model = fuse(load_model(fetch("ppocr_cls"))).model
    test, meta = make_inputs("ppocr_cls", n=held_out, seed=99, return_meta=True)
    fp32 = accuracy(predict(model, test, batch=64), meta["labels"])
    settings: list[tuple[str, dict[str, Any]]] = [
        ("SparseGPT, mask rule `saliency` (the paper's)", {"mask_rule": "saliency"}),
        ("SparseGPT, mask rule `obs` (the default)", {"mask_rule": "obs"}),
    ]
    body = []
    for title, options in settings:
        ratios, seconds = [], []
        for seed in seeds:
            calib = make_inputs("ppocr_cls", n=calib_samples, seed=seed)
            start = time.perf_counter()
            sparse = run_passes(model, [make_pass("sparsify_2to4", options)], calibration=calib, batch_size=16).model
            seconds.append(time.perf_counter() - start)
            ratios.append(accuracy(predict(sparse, test, batch=64), meta["labels"]) / fp32)
            print(f"  {title}, seed {seed}: {ratios[-1]:.4f} of fp32 ({seconds[-1]:.1f} s)", flush=True)
        cells = [f"{r:.3f}" for r in ratios]
        body.append(
            [title, *cells, f"{min(ratios):.3f}", f"{statistics.mean(ratios):.3f}", common.fmt(max(seconds), 1)]
        )
    magnitude = sparsify(model, pattern="2:4", method="magnitude", fuse=False).model
    ratio = accuracy(predict(magnitude, test, batch=64), meta["labels"]) / fp32
    body.append(["magnitude (no data)", *[f"{ratio:.3f}"] * len(seeds), f"{ratio:.3f}", f"{ratio:.3f}", "-"])
    headers = ["2:4 method", *[f"seed {s}" for s in seeds], "min", "mean", "compress s (max)"]
    table = common.markdown_table(headers, body, "l" + "r" * (len(seeds) + 3))
    return (
        f"`python bench/sparsity.py --seeds {','.join(map(str, seeds))}`: 2:4 on every layer of the PP-OCR "
        f"MobileNetV3 classifier (`ppocr_cls`, fused; the first conv on 3 image channels and the depthwise "
        f"convs stay dense) by SparseGPT with the default target (sequential, fitted to the dense model's "
        f"outputs), {calib_samples} calibration lines drawn with each seed; top-1 on {held_out} held-out "
        f"lines (seed 99) relative to fp32's {fp32:.2f} %. The issue asks for >= 0.95.\n\n{table}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and latency runs")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--seeds", help="only the 2:4 SparseGPT study over these calibration seeds (e.g. 1,2,3,4,5)")
    args = parser.parse_args()
    if args.seeds:
        text = seed_study([int(s) for s in args.seeds.split(",")], 1500, 64)
        env = common.environment_line(["numpy", "onnx", "onnxruntime"])
        text = f"{text}\n\n{env} Load average at the end: {common.load_average()}."
        print(text, flush=True)
        if not args.no_write:
            common.write_readme_section(README, SEEDS_SECTION, text)
            print(f"wrote the {SEEDS_SECTION!r} section of {README}")
        return
    runs = 10 if args.quick else 30
    builders: list[Callable[[bool], Case]] = [digits, ppocr_cls]
    parts = []
    for build in builders:
        case = build(args.quick)
        print(f"{case.name}: compressing", flush=True)
        rows = measure(case, runs)
        text = table(rows)
        print(text, flush=True)
        parts.append(f"### {case.title}\n\n{text}")
    env = common.environment_line(["numpy", "onnx", "onnxruntime"])
    body = "\n\n".join([INTRO, *parts, NOTES, f"{env} Load average at the end: {common.load_average()}."])
    if not args.no_write:
        common.write_readme_section(README, SECTION, body)
        print(f"wrote the {SECTION!r} section of {README}")


INTRO = """\
`python bench/sparsity.py` (about 3 minutes on 2 cores). Every setting starts from the fused fp32
model; pruning removes the same fraction of every prunable layer's output channels (weight L2 norm;
layers whose channels reach a graph output, a run-time Reshape, etc. are left alone) and, with
reconstruction, refits each consumer by least squares on the calibration data. INT8 is W8
per-channel + A8 per-tensor static (calibrated); INT4 is per-channel weights with float
activations. top-1 is on held-out data; cosine compares the outputs with the fp32 model's; params,
MACs (one sample) and size are relative to fp32; latency is onnxruntime CPU, 1 thread, a batch of
256 digits or 16 text lines."""

NOTES = """\
Notes:

* 2:4 keeps the weights' shapes: it changes neither MACs nor latency in onnxruntime on CPU (no
  sparse kernels); its gain needs sparse tensor-core hardware. The pattern holds on 100 % of the
  groups of every sparsified layer, and still does after INT8/INT4 quantization (a zero stays a
  zero code; `onnxcomp inspect` shows it per weight).
* Channel pruning really shrinks the model: parameters, MACs and file size drop with the ratio.
  Without reconstruction the accuracy collapses quickly; the least-squares refit of the consumers
  (sequential: each consumer is refit on the pruned model's actual inputs) recovers most of it.
* Latency follows the MACs only when the kept channel counts suit the kernels: onnxruntime's
  x86 convs run in an NCHWc layout with blocks of 16 channels (AVX-512; 8 with AVX2), and a layer
  left with, say, 12 or 24 channels drops out of it, adding layout reorders. `round_to 16`
  (`--round-to 16`) keeps the layout end to end; it prunes less of the narrow layers, which
  `scope = "global"` (`--global`) compensates by pruning the wider ones more.
* The MobileNetV3 classifier is tiny (its first layers have 8 to 16 channels) and pruned
  uniformly here; `--layer-ratio`, `--skip` and `--criterion data` trade size for accuracy."""


if __name__ == "__main__":
    main()
