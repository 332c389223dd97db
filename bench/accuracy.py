"""Accuracy-driven quantization on the real bench models: the sensitivity curve and two targets.

For each model and low-bit setting it runs (in this process, on the same calibration and
held-out data):

* ``onnxcomp.quantize(..., sensitivity=True)``: the greedy curve, the metric as nodes are quantized
  least sensitive first (the others float), against the fraction of weights quantized;
* ``onnxcomp.quantize(..., accuracy_target=T)`` for two targets: met or not, the score on the
  evaluation data, the held-out score of the written model, the number of candidate models, the
  wall time, the weight bytes and the share of MACs left at 8 bits or fewer.

Run from the repo root::

    .venv/bin/python bench/accuracy.py            # ~10 min on 2 cores (ppocr_cls, minilm_l3)
    .venv/bin/python bench/accuracy.py --quick    # fewer samples, one model
    .venv/bin/python bench/accuracy.py --no-readme

The result replaces the "## Accuracy-driven quantization" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _common as common  # noqa: E402 - after the sys.path insert

import onnxcomp  # noqa: E402
from models.fetch import MODELS, fetch, make_inputs  # noqa: E402
from onnxcomp.analysis.scoring import Scorer  # noqa: E402
from onnxcomp.model_io import load_model  # noqa: E402

W4A8 = {"weights": "int4", "granularity": "channel"}
#: (model, label, quantize keywords, metric, two targets)
CASES: list[tuple[str, str, dict[str, Any], str, tuple[str, str]]] = [
    ("ppocr_cls", "W4A8", W4A8, "agree", ("agree:0.99", "agree:0.995")),
    ("minilm_l3", "W4A8", {**W4A8, "granularity": "group:32"}, "cos", ("cos:0.99", "cos:0.995")),
]


def _data(name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    feeds = make_inputs(name, n, seed)
    return feeds[0] if isinstance(feeds, tuple) else feeds


def run_case(case: tuple[str, str, dict[str, Any], str, tuple[str, str]], samples: int, curve: bool) -> dict[str, Any]:
    name, label, kw, metric, targets = case
    model = fetch(name)
    calib, held = _data(name, samples, 0), _data(name, samples, 1)
    out: dict[str, Any] = {"model": name, "setting": label, "targets": []}
    reference = load_model(model)
    held_scorer = Scorer(reference, [{k: v for k, v in held.items()}], metric)
    with tempfile.TemporaryDirectory() as tmp:
        if curve:
            start = time.perf_counter()
            report = onnxcomp.quantize(str(model), calibration=calib, sensitivity=True, reports=False, **kw)
            data = report.result("quantize").data["sensitivity"]
            out["curve"] = data["curve"]
            out["curve_seconds"] = time.perf_counter() - start
            out["curve_trials"] = data["trials"]
        for target in targets:
            path = Path(tmp) / "q.onnx"
            start = time.perf_counter()
            report = onnxcomp.quantize(
                str(model), path, calibration=calib, accuracy_target=target, reports=False, force=True, **kw
            )
            seconds = time.perf_counter() - start
            search = report.result("quantize").data["search"]
            out["targets"].append(
                {
                    "target": target,
                    "met": search["met"],
                    "score": search["score"],
                    "held_out": held_scorer.score(load_model(path)),
                    "trials": search["trials"],
                    "seconds": seconds,
                    "raised": len(search["fallback"]),
                    "weight_bytes": search["weight_bytes"],
                    "low_macs": search["low_precision_macs"],
                    "start_score": search["history"][0]["score"],
                }
            )
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        for t in r["targets"]:
            rows.append(
                [
                    r["model"],
                    r["setting"],
                    t["target"],
                    "yes" if t["met"] else "no",
                    common.fmt(t["start_score"], 5),
                    common.fmt(t["score"], 5),
                    common.fmt(t["held_out"], 5),
                    t["raised"],
                    f"{t['low_macs']:.1%}" if t["low_macs"] is not None else "?",
                    f"{t['weight_bytes'] / 1024:.0f} KiB",
                    t["trials"],
                    f"{t['seconds']:.0f} s",
                ]
            )
    headers = [
        "model",
        "setting",
        "target",
        "met",
        "all low-bit",
        "found",
        "held-out",
        "nodes raised",
        "MACs <= 8 bit",
        "weights",
        "trials",
        "wall",
    ]
    text = common.markdown_table(headers, rows)
    for r in results:
        if "curve" in r:
            points = ", ".join(f"{p['fraction']:.2f}: {p['score']:.5f}" for p in r["curve"])
            text += (
                f"\n\nGreedy curve, {r['model']} {r['setting']} ({r['curve_trials']} candidates, "
                f"{r['curve_seconds']:.0f} s), fraction of weights quantized: metric: {points}"
            )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, fewer samples")
    parser.add_argument("--no-readme", action="store_true", help="print only; leave bench/README.md alone")
    args = parser.parse_args()
    cases = CASES[:1] if args.quick else CASES
    samples = 16 if args.quick else 32
    results = []
    for case in cases:
        if case[0] not in MODELS:
            continue
        print(f"{case[0]} {case[1]} ...", flush=True)
        results.append(run_case(case, samples, curve=True))
    body = (
        f"{common.environment_line(['onnxruntime', 'onnx'])}\n\n"
        f"`onnxcomp quantize --accuracy-target` from the all-low-bit setting: the score on the "
        f"evaluation data (the first 8 calibration batches; {samples} samples) and on held-out inputs "
        "(another seed), how many nodes fell back up their ladder (docs/accuracy.md), the share of "
        "MACs still at 8 bits or fewer, the weight bytes, the candidate models built and scored, and "
        "the wall time (one process, `bench/accuracy.py`).\n\n" + table(results)
    )
    print(body)
    if not args.no_readme:
        common.write_readme_section(REPO / "bench" / "README.md", "Accuracy-driven quantization", body)


if __name__ == "__main__":
    main()
