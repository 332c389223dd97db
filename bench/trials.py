"""Sensitivity trials on threads, worker processes and a local Ray cluster: wall time, same figures.

``onnxcomp.quantize(..., sensitivity=True)`` (every node's "only quantized" and "only in float"
score plus the greedy curve) on one model, scored four ways in ONE process, interleaved over
``--rounds`` rounds (medians): 1 thread, 2 threads (``trial_workers=2``), 2 worker processes
(``workers=2``: calibration and trials) and a local Ray cluster of 2 CPUs (``ray.init(num_cpus=2)``, joined with
``ray="auto"``; its start-up is timed apart). 'same' = the sensitivity figures (ranking, every
score, the curve) are bit-equal to the 1-thread run's and the model bytes identical.

Run from the repo root::

    .venv/bin/python bench/trials.py                    # ppocr_cls W4A8, 2 rounds (~6 min on 2 cores)
    .venv/bin/python bench/trials.py --model digits     # the demo CNN (seconds)
    .venv/bin/python bench/trials.py --no-readme

The result replaces the "## Scale: sensitivity trials on workers (issue 18)" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _common as common  # noqa: E402 - after the sys.path insert

import onnxcomp  # noqa: E402
from onnxcomp.analysis.scoring import Scorer  # noqa: E402

SCORING = [0.0]  # seconds spent in Scorer.measure in this process (all of it with 1 thread)


def _timed_measure(measure: Any) -> Any:
    def timed(self: Scorer, candidate: Any) -> float:
        start = time.perf_counter()
        try:
            return float(measure(self, candidate))
        finally:
            SCORING[0] += time.perf_counter() - start

    return timed


HEADING = "## Scale: sensitivity trials on workers (issue 18)"
W4A8 = {"weights": "int4", "granularity": "channel", "reports": False}
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("1 thread", {}),
    ("2 threads (--trial-workers 2)", {"trial_workers": 2}),
    ("2 worker processes (--workers 2)", {"workers": 2}),
    ("local Ray cluster, 2 actors (--ray auto)", {"ray": "auto"}),
]


def _model_and_data(name: str, samples: int) -> tuple[str, dict[str, np.ndarray]]:
    if name == "digits":
        calib = {"input": np.load(REPO / "models" / "digits_calib.npz")["input"][:samples]}
        return str(REPO / "models" / "digits_cnn.onnx"), calib
    from models.fetch import fetch, make_inputs

    feeds = make_inputs(name, samples, 0)
    return str(fetch(name)), feeds[0] if isinstance(feeds, tuple) else feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ppocr_cls", help="ppocr_cls (default) or digits")
    ap.add_argument("--samples", type=int, default=32, help="calibration (= evaluation) samples")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians)")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    import ray

    model, calib = _model_and_data(args.model, args.samples)
    load_start = common.load_average()
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    Scorer.measure = _timed_measure(Scorer.measure)  # type: ignore[method-assign]
    scoring: list[float] = []
    seconds: dict[str, list[float]] = {label: [] for label, _ in CONFIGS}
    figures: dict[str, tuple[str, bytes]] = {}
    trials = 0
    try:
        for r in range(args.rounds):
            for label, extra in CONFIGS:
                SCORING[0] = 0.0
                start = time.perf_counter()
                report = onnxcomp.quantize(model, calibration=calib, sensitivity=True, **W4A8, **extra)
                seconds[label].append(time.perf_counter() - start)
                if not extra:
                    scoring.append(SCORING[0])
                data = report.result("quantize").data["sensitivity"]
                trials = data["trials"]
                figures[label] = (json.dumps(data, sort_keys=True), report.model.SerializeToString())
                print(f"round {r + 1}: {label}: {seconds[label][-1]:.1f} s", flush=True)
    finally:
        ray.shutdown()
    load_end = common.load_average()
    base = statistics.median(seconds[CONFIGS[0][0]])
    rows = []
    for label, _ in CONFIGS:
        med = statistics.median(seconds[label])
        same = "yes" if figures[label] == figures[CONFIGS[0][0]] else "NO"
        rows.append([label, f"{med:.1f}", f"{base / med:.2f}x", same])
    table = common.markdown_table(["trials scored on", "seconds (median)", "speed-up", "same"], rows, "lrrl")
    nodes = len(json.loads(figures[CONFIGS[0][0]][0])["nodes"])
    score_s = statistics.median(scoring)
    share = f"{score_s:.1f} s of the 1-thread run's {base:.1f} s are scoring (Scorer.measure)"
    best = base - score_s / 2
    bound = f"{base:.1f} - {score_s:.1f} / 2 = {best:.1f} s, {base / best:.2f}x"
    body = f"""`python bench/trials.py --model {args.model} --samples {args.samples} --rounds {args.rounds}`: `onnxcomp sensitivity` (`quantize(..., sensitivity=True)`, W4A8 per channel) on {args.model}: {nodes} nodes, {trials} candidate models (each node only quantized and only in float, plus the greedy curve), scored on {args.samples} calibration samples. The four ways run in one process, interleaved over {args.rounds} rounds; medians of the wall time of the whole `quantize` call (calibration included, the Ray cluster's start-up apart: {ray_start:.1f} s). 'same' = the ranking, every score and the curve bit-equal to the 1-thread run's, and the same model bytes.

{table}

Where the time goes: {share}; the rest is building the candidates (a quantize pass over the float graph each: in the driver with processes or Ray, on the threads but under the GIL with threads), the calibration and the final model. With two scorers the wall time cannot drop below the build time plus half the scoring time (Amdahl's bound, {bound}). Candidates are built in the driver, one after another (the activation statistics are collected once and cached), and scored (an onnxruntime session over the evaluation data) by the workers, which received the Scorer (evaluation batches and the float model's outputs) once; per trial only the candidate's bytes travel. On this 2-core machine two scorers compete with the driver's building for the same cores, so the speed-up is bounded by the share of a trial spent scoring; threads share the driver's memory (no pickling) but hold the GIL while building. On a Ray cluster of several nodes the scoring spreads over their CPUs while the driver keeps building: the speed-up is then bounded by building (one process) against scoring (N actors). Timings on a machine shared with other jobs are noisy; compare rows of one run.

Load average: {load_start} at the start, {load_end} at the end (`os.getloadavg`).

{common.environment_line(["onnxruntime", "numpy", "ray"])}"""
    print(table)
    print(share)
    if not args.no_readme:
        common.write_readme_section(REPO / "bench" / "README.md", HEADING, body)
        print("updated bench/README.md")


if __name__ == "__main__":
    main()
