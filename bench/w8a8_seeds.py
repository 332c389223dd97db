"""Default W8A8 static against onnxruntime.quantization's static QDQ variants, over calibration seeds.

Run from the repo root::

    .venv/bin/python bench/w8a8_seeds.py              # ~10 min at load 12 on 2 cores
    .venv/bin/python bench/w8a8_seeds.py --no-readme

bench/algorithms.py compares one calibration draw on small held-out sets, where one sample decides
the task metric. This script repeats the comparison over three calibration draws on larger held-out
sets: the demo digits CNN (64 calibration digits per draw; all 540 held-out digits: top-1 agreement
with fp32, the metric a quantized model answers to, and top-1 vs labels, where fp32 misses one digit)
and ppocr_rec (8 calibration lines per draw, as bench/algorithms.py; 256 held-out lines, character
accuracy of the greedy CTC decode vs the ground truth). onnxcomp: ``onnxcomp.quantize`` defaults.
ORT: ``quantize_static`` QDQ with MinMax, Percentile (99.999) and Entropy (bench/ptq.py's child,
same batches). The result replaces the section "Default W8A8 over calibration draws" of
bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import _common as common  # noqa: E402 - after the sys.path insert
import algorithms  # noqa: E402 - bench/algorithms.py: its README path
import ptq  # noqa: E402 - bench/ptq.py: the ORT static child

import onnxcomp.api as api  # noqa: E402
from models.fetch import MODELS, ctc_decode, fetch, make_inputs  # noqa: E402
from onnxcomp.analysis.metrics import cosine, predict  # noqa: E402

SECTION = "## Default W8A8 over calibration draws"
VARIANTS = ("onnxcomp defaults", "ORT minmax", "ORT percentile", "ORT entropy")
Evaluate = Callable[[str], tuple[float, float, float]]  # metric %, second metric % (or nan), cosine


def digits() -> tuple[str, Evaluate, Callable[[int], dict[str, np.ndarray]], int]:
    model = str(REPO / "models" / "digits_cnn.onnx")
    with np.load(REPO / "models" / "digits_heldout.npz") as held, np.load(REPO / "models" / "digits_calib.npz") as cal:
        x, y, pool = held["input"], held["label"], cal["input"]
    ref = predict(common.as_proto(model), {"input": x}, batch=64, threads=2)

    def evaluate(path: str) -> tuple[float, float, float]:
        out = predict(common.as_proto(path), {"input": x}, batch=64, threads=2)
        agree = float((out.argmax(1) == ref.argmax(1)).mean() * 100)
        return agree, float((out.argmax(1) == y).mean() * 100), cosine(ref, out)

    def draw(seed: int) -> dict[str, np.ndarray]:
        return {"input": pool[np.random.default_rng(seed).choice(len(pool), 64, replace=False)]}

    return model, evaluate, draw, 64


def rec() -> tuple[str, Evaluate, Callable[[int], dict[str, np.ndarray]], int]:
    model = str(fetch("ppocr_rec"))
    output = MODELS["ppocr_rec"]["primary_output"]
    held, meta = make_inputs("ppocr_rec", 256, seed=2, return_meta=True)
    ref = predict(common.as_proto(model), held, batch=16, output=output, threads=2)

    def evaluate(path: str) -> tuple[float, float, float]:
        probs = predict(common.as_proto(path), held, batch=16, output=output, threads=2)
        return common.char_accuracy(ctc_decode(probs, model), meta["texts"]), float("nan"), cosine(ref, probs)

    return model, evaluate, lambda seed: make_inputs("ppocr_rec", 8, seed=seed), 8


def measure(name: str, setup: Callable[[], tuple], seeds: list[int], work: Path) -> list[list[str]]:
    model, evaluate, draw, n = setup()
    fp32 = evaluate(model)
    scores: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
    for seed in seeds:
        calib = work / f"{name}_calib{seed}.npz"
        np.savez(calib, **draw(seed))
        out = work / f"{name}_oc{seed}.onnx"
        api.quantize(
            model, str(out), calibration=ptq._load_npz(str(calib), n), calib_samples=n, batch_size=8, reports=False
        )
        scores["onnxcomp defaults"].append(evaluate(str(out)))
        for observer in ("minmax", "percentile", "entropy"):
            out = work / f"{name}_ort{seed}{observer}.onnx"
            task = {"model": model, "out": str(out), "calib": str(calib), "n": n, "bs": 8, "observer": observer,
                    "observer_options": {"percentile": ptq.PERCENTILE}}  # fmt: skip
            ptq.child_ort_static(task)
            scores[f"ORT {observer}"].append(evaluate(str(out)))
        print(name, seed, {k: v[-1] for k, v in scores.items()}, flush=True)

    def second(values: list[float]) -> str:
        return "" if np.isnan(values).all() else common.fmt(float(np.mean(values)), 2)

    rows = [[name, "fp32", common.fmt(fp32[0], 2), "", second([fp32[1]]), "1"]]
    for variant, vals in scores.items():
        metric = [m for m, _, _ in vals]
        rows.append([name, variant, common.fmt(float(np.mean(metric)), 2), " / ".join(common.fmt(m, 2) for m in metric),
                     second([s for _, s, _ in vals]), common.fmt(float(np.mean([c for _, _, c in vals])), 5)])  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-readme", action="store_true", help="print only; leave bench/README.md alone")
    args = parser.parse_args()
    seeds = [1, 3, 5]
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # ORT's preparation (bench/ptq.py) writes its intermediate models to the cwd
        rows = measure("digits", digits, seeds, Path(tmp)) + measure("ppocr_rec", rec, seeds, Path(tmp))
    table = common.markdown_table(
        ["model", "variant", "metric mean", f"per draw (seeds {seeds})", "digits top-1 vs labels", "cos vs fp32"], rows
    )
    body = (
        f"`bench/w8a8_seeds.py`: bench/algorithms.py compares {__doc__.split('bench/algorithms.py compares', 1)[1].split('The result', 1)[0].strip()}\n\n"
        f"Metric: digits top-1 agreement with fp32 %, ppocr_rec character accuracy %. {common.environment_line(['onnxruntime']).rstrip('.')}; "
        f"load {common.load_average()}.\n\n{table}"
    )
    print(body)
    if not args.no_readme:
        common.write_readme_section(algorithms.README, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
