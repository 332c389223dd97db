"""Tensor decomposition benchmark (issue 7, item 7): MACs, parameters, latency and accuracy.

Run from the repo root: ``python bench/decompose.py`` (``--no-write`` only prints). For each
model it measures the fp32 model (after the deployment fusions), INT8 quantization alone, and
every rank rule with SVD factors only ("svd"), with the least-squares refit of the second
factors on calibration data ("refit"), and refit followed by INT8 quantization:

* the digits demo CNN (``models/digits_cnn.onnx``; too-small threshold ``min_channels = 16``,
  as its convs have 16..64 channels; one row with the reference toolkit's default 64):
  held-out accuracy and logit cosine vs fp32, latency of a batch of 64;
* PP-OCRv6 small text detector (``ppocr_det``, ``rapidocr`` wheel): cosine and IoU of the
  binarized (> 0.3) text map vs fp32 on 4 synthetic 480x640 pages, latency of one page;
* MiniLM-L3 (``minilm_l3``) with ``decompose_matmul``: cosine of the sentence embeddings.

MACs are counted by ``onnxcomp.macs`` for one sample (a 16x16 digit, a 480x640 page; MiniLM:
weight MACs per token). Latency is the onnxruntime CPU time on one thread of a batch of 64
digits, one page, or 16 sentences of 24 tokens, timed round-robin with the fp32 model
(``bench/_common.py``) so load from other processes hits both alike. The tables replace the
"## Decomposition" section of bench/README.md.
"""

from __future__ import annotations

import argparse
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
from onnxcomp.analysis.inspect import summarize  # noqa: E402
from onnxcomp.analysis.macs import model_macs, with_input_shapes  # noqa: E402
from onnxcomp.analysis.metrics import accuracy, cosine, predict  # noqa: E402
from onnxcomp.api import decompose, quantize  # noqa: E402
from onnxcomp.testing import run_model  # noqa: E402

README = REPO / "bench" / "README.md"
SECTION = "## Decomposition"
NOTHING = {"min_channels": 10**9}  # a decompose run that declines everything: the fused fp32 model
INTRO = (
    "Low-rank tensor decomposition (`onnxcomp decompose`): each rank rule with SVD factors only (svd),\n"
    "with the second factors refit by least squares on calibration data (refit), and refit followed\n"
    'by INT8 quantization (`onnxcomp quantize` defaults). "saved" is the reduction of conv MACs\n'
    "(MatMul weight MACs per token for MiniLM) against fp32. Latency: onnxruntime CPU, one thread,\n"
    'median of the runs, each timed round-robin with the fp32 model ("vs fp32" = the ratio of the\n'
    "two medians; < 1 is faster). Regenerate with `python bench/decompose.py`."
)
NOTES = (
    "Notes. The refit is what makes low ranks usable: on every model the SVD-only pair loses accuracy\n"
    "that the least-squares refit of the second factor recovers, and INT8 quantization on top costs\n"
    "about what it costs the fp32 model. The automatic rule's band (AMCT's `[L//7, L//6]`) sets the\n"
    "rank for these weights (EVBMF's noise-floor estimate is below the band for the demo's trained\n"
    "convs); it is tuned for convs and too aggressive for MiniLM's MatMuls, where `energy:0.9` + refit\n"
    "keeps the embeddings close. PP-OCRv6 det has only 3 dense convs with k >= 3 (61 of its 83 convs\n"
    "are 1x1, 17 depthwise), so the 3x3 decomposition saves little there; `min_kernel = 1` also factors\n"
    '1x1 convs (a 1x1 conv is a matrix). Its large "vs fp32" gain is mostly an onnxruntime effect: two\n'
    "768->384 1x1 convs (`Conv.50`, `Conv.53`, ~5% of the MACs) take ~45% of the fp32 run time in\n"
    "onnxruntime 1.32 (NCHWc Conv with a fused Add), and their low-rank pairs avoid that path.\n"
    "Latencies on this shared 2-CPU machine vary by up to 2x between runs of the same model."
)

Feeds = Mapping[str, np.ndarray]


@dataclass
class Case:
    """One model: how to load, feed, score and what to vary."""

    title: str
    path: Path
    ops: str
    rules: tuple[str, ...]
    options: dict[str, Any]
    calib: Feeds
    test: Feeds
    timing: Feeds
    score: Callable[[onnx.ModelProto, onnx.ModelProto], str]  # (model, fp32) -> quality text
    quality: str
    int8: bool = True
    extra: tuple[tuple[str, dict[str, Any]], ...] = ()


def macs(model: onnx.ModelProto, feeds: Feeds) -> tuple[int, int]:
    """(Conv MACs, all Conv/ConvTranspose/Gemm/MatMul MACs) for ``feeds``' shapes."""
    counted = model_macs(with_input_shapes(model, {name: value.shape for name, value in feeds.items()}))
    total = sum(m.macs or 0 for m in counted)
    return sum(m.macs or 0 for m in counted if m.op == "Conv"), total


def weight_macs_per_row(model: onnx.ModelProto) -> int:
    """MACs per row (token) of the MatMul/Gemm nodes with a constant 2-D weight: sum of K*N.

    Used for MiniLM, where ``onnxcomp.macs`` cannot count MatMuls (shape inference loses the
    batch dim at the position-ids Slice).
    """
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    dims = [inits.get(n.input[1]) for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1]
    return sum(d[0] * d[1] for d in dims if d is not None and len(d) == 2)


def timing(model: onnx.ModelProto, fp32: onnx.ModelProto, feeds: Feeds, runs: int) -> tuple[float, float]:
    """(median ms of ``model``, its ratio to fp32) timed round-robin with the fp32 model.

    ``bench/_common.interleaved_latency_ms``: a burst of load from other processes on a shared
    machine hits both models alike, so the ratio is steadier than either time.
    """
    base, ms = common.interleaved_latency_ms([fp32, model], feeds, threads=1, runs=runs, warmup=3)
    return ms, ms / base


def fmt_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def row(case: Case, label: str, model: onnx.ModelProto, fp32: onnx.ModelProto, decomposed: int | str, runs: int) -> str:
    one = {k: v[:1] for k, v in case.timing.items()}  # MACs per sample
    if case.ops == "conv":
        (kind, total), (base_kind, _) = macs(model, one), macs(fp32, one)
        total_text = fmt_count(total)
    else:
        kind, base_kind, total_text = weight_macs_per_row(model), weight_macs_per_row(fp32), "-"
    saved = f"{(1 - kind / base_kind) * 100:.1f}%" if base_kind else "-"
    params = summarize(model).param_count
    ms, ratio = timing(model, fp32, case.timing, runs)
    text = (
        f"| {label} | {decomposed} | {fmt_count(kind)} | {saved} | {total_text} | {fmt_count(params)} "
        f"| {ms:.2f} | {ratio:.2f} | {case.score(model, fp32)} |"
    )
    print(text, flush=True)
    return text


def run_case(case: Case, runs: int) -> str:
    print(f"\n{case.title}", flush=True)
    fp32 = decompose(case.path, ops=case.ops, options=NOTHING).model
    head = "conv MACs" if case.ops == "conv" else "MatMul MACs / token"
    lines = [
        f"### {case.title}",
        "",
        f"| variant | decomposed | {head} | saved | all MACs | params | latency ms | vs fp32 | {case.quality} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines.append(row(case, "fp32 (fused)", fp32, fp32, 0, runs))
    if case.int8:
        lines.append(row(case, "int8 only", quantize(fp32, calibration=case.calib).model, fp32, 0, runs))
    variants: list[tuple[str, str, dict[str, Any]]] = [(r, r, case.options) for r in case.rules]
    variants += [(label, rule_opts["rank_rule"], {**case.options, **rule_opts}) for label, rule_opts in case.extra]
    for label, rule, options in variants:
        opts = {k: v for k, v in options.items() if k != "rank_rule"}
        for refit in (False, True):
            report = decompose(
                case.path, ops=case.ops, rank_rule=rule, options=opts, calibration=case.calib if refit else None
            )
            count = len(report.steps[-1].result.data["record"]["nodes"])
            if count == 0:  # nothing decomposed: the model is the fp32 one, one row says so
                lines.append(f"| {label} | 0 | - | 0.0% | - | - | - | - | = fp32 |")
                break
            lines.append(row(case, f"{label}, {'refit' if refit else 'svd'}", report.model, fp32, count, runs))
            if refit and case.int8:
                q = quantize(report.model, calibration=case.calib, fuse=False).model
                lines.append(row(case, f"{label}, refit + int8", q, fp32, count, runs))
    return "\n".join(lines)


def demo_case() -> Case:
    held = np.load(REPO / "models" / "digits_heldout.npz")
    calib = dict(np.load(REPO / "models" / "digits_calib.npz"))
    test = {"input": held["input"]}

    def score(model: onnx.ModelProto, fp32: onnx.ModelProto) -> str:
        out, ref = predict(model, test), predict(fp32, test)
        return f"{accuracy(out, held['label']):.2f}% / {cosine(out, ref):.5f}"

    return Case(
        "digits demo CNN (4 Conv 3x3, 16-64 channels), `min_channels = 16`",
        REPO / "models" / "digits_cnn.onnx",
        "conv",
        ("auto", "energy:0.6", "ratio:0.25", "ratio:0.5", "rank:16"),
        {"min_channels": 16},
        calib,
        test,
        {"input": held["input"][:64]},
        score,
        "accuracy / cosine",
        extra=(("auto, default thresholds (min_channels 64)", {"rank_rule": "auto", "min_channels": 64}),),
    )


def ppocr_case() -> Case:
    calib = make_inputs("ppocr_det", n=8, seed=1)
    test = make_inputs("ppocr_det", n=4, seed=0)

    def score(model: onnx.ModelProto, fp32: onnx.ModelProto) -> str:
        out, ref = predict(model, test, batch=1), predict(fp32, test, batch=1)
        a, b = out > 0.3, ref > 0.3
        iou = (a & b).sum() / max((a | b).sum(), 1)
        return f"{cosine(out, ref):.5f} / {iou:.4f}"

    return Case(
        "PP-OCRv6 small text detector (`ppocr_det`, 83 Conv: 61 1x1, 17 depthwise), `min_channels = 16`",
        fetch("ppocr_det"),
        "conv",
        ("auto", "rank:32", "energy:0.9"),
        {"min_channels": 16},
        calib,
        test,
        {"x": test["x"][:1]},
        score,
        "cosine / text-map IoU",
        extra=(
            ("auto, default thresholds (min_channels 64)", {"rank_rule": "auto", "min_channels": 64}),
            ("auto, 1x1 convs too (min_kernel 1)", {"rank_rule": "auto", "min_kernel": 1}),
            ("energy:0.9, 1x1 convs too (min_kernel 1)", {"rank_rule": "energy:0.9", "min_kernel": 1}),
        ),
    )


def minilm_case() -> Case:
    calib = make_inputs("minilm_l3", n=64, seed=1, seq_len=24)
    test = make_inputs("minilm_l3", n=64, seed=0, seq_len=24)

    def score(model: onnx.ModelProto, fp32: onnx.ModelProto) -> str:
        index = [o.name for o in fp32.graph.output].index("461")
        out, ref = run_model(model, test)[index], run_model(fp32, test)[index]
        rows = np.sum(out * ref, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        return f"{rows.mean():.4f} / {rows.min():.4f}"

    return Case(
        "MiniLM-L3 sentence encoder (`minilm_l3`, 18 MatMul weights 384x384 / 384x1536), `decompose_matmul`",
        fetch("minilm_l3"),
        "matmul",
        ("auto", "energy:0.9", "ratio:0.25"),
        {},
        calib,
        test,
        {k: v[:16] for k, v in test.items()},
        score,
        "embedding cosine mean / min",
        int8=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave bench/README.md alone")
    parser.add_argument("--models", default="demo,ppocr_det,minilm_l3", help="comma-separated subset")
    args = parser.parse_args()
    started = time.perf_counter()
    cases = {"demo": (demo_case, 200), "ppocr_det": (ppocr_case, 10), "minilm_l3": (minilm_case, 50)}
    tables = [run_case(make(), runs) for name, (make, runs) in cases.items() if name in args.models.split(",")]
    env = common.environment_line(["onnxcomp", "onnx", "onnxruntime", "numpy"])
    env += (
        f" Load average {common.load_average()} at the end of the run (a shared machine); "
        f"{time.perf_counter() - started:.0f} s."
    )
    body = INTRO + "\n\n" + "\n\n".join(tables) + "\n\n" + NOTES + "\n\n" + env
    print("\n" + body)
    if not args.no_write:
        common.write_readme_section(README, SECTION, body)
        print(f"\nwrote {README.relative_to(REPO)}")


if __name__ == "__main__":
    main()
