"""Peak memory and latency of emulated low-bit activations (issue 11, item 6) on onnxruntime CPU.

FP8 / HiF8 / MX activations have no ORT kernel: onnxcomp writes them as float subgraphs
(``onnxcomp/quant/activation_subgraphs.py``). This bench measures what those subgraphs cost at a
batch where activations dominate memory::

    .venv/bin/python bench/emulated.py                          # demo, ppocr_det, minilm_l3, ppocr_rec
    .venv/bin/python bench/emulated.py --models demo,minilm_l3 --json out/emulated.json

For every model and variant (``VARIANTS``: fp32 as shipped, then ``onnxcomp.quantize(model,
calibration=..., weights=W, activations=A, dynamic=...)``) it reports

* the peak RSS (VmHWM) of a fresh process that loads onnxruntime, the inputs and the model (one
  CPU session, ORT_ENABLE_ALL, 1 intra-op thread) and runs it ``--mem-runs`` times, and its ratio
  to the fp32 model's; "run delta" is that peak minus the peak before the first run (the
  activations and workspace only);
* the median ``session.run`` time and its ratio to fp32, all variants of one model timed
  round-robin in one process (``_common.interleaved_latency_stats``), 1 thread, ORT_ENABLE_ALL;
* the median CPU time of the same runs (``time.thread_time``: with one intra-op thread onnxruntime
  runs every kernel on the calling thread) and its ratio: on a shared machine the wall ratio moves
  with the other processes' load (+-10%), the CPU ratio much less (it still includes the cache and
  memory-bandwidth contention).

``--weight-only`` adds the weight-only variants (``WEIGHT_ONLY``): the difference to them is what
the activation subgraphs cost.

Inputs: ``models.fetch.make_inputs(name, n, seed=1)`` (calibration: seed 0) and the demo's npz
files; batch sizes in ``MODELS``. Prints Markdown; ``--json PATH`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _common as common  # noqa: E402 - bench/_common.py

#: (label, quantize() keywords, needs calibration); None = the fp32 model as shipped
VARIANTS: list[tuple[str, dict[str, Any] | None, bool]] = [
    ("fp32", None, False),
    ("hif8 / hif8 dynamic", {"weights": "hif8", "activations": "hif8", "dynamic": True}, False),
    ("hif8 / hif8 static", {"weights": "hif8", "activations": "hif8"}, True),
    ("fp8_e4m3 / fp8_e4m3 static", {"weights": "fp8_e4m3", "activations": "fp8_e4m3"}, True),
    ("mxfp8 / mxfp8", {"weights": "mxfp8", "activations": "mxfp8"}, False),
]

#: ``--weight-only``: the same weights without activation quantization, to separate what the
#: activation subgraphs cost from what the weight format costs (e.g. DequantizeLinear weights
#: that onnxruntime cannot pre-pack for its NCHWc convolutions)
WEIGHT_ONLY: list[tuple[str, dict[str, Any] | None, bool]] = [
    ("hif8 / none", {"weights": "hif8", "activations": "none"}, False),
    ("fp8_e4m3 / none", {"weights": "fp8_e4m3", "activations": "none"}, False),
    ("mxfp8 / none", {"weights": "mxfp8", "activations": "none"}, False),
]


#: ``--dq-weights``: the emulated variants with their FP8 / MXFP8 weights written as DequantizeLinear
#: (``float_weight_format = "dq"``, decoded at every run) instead of the default ``cast`` form that
#: onnxruntime folds at load: the difference is what the weight form costs
DQ_WEIGHTS: list[tuple[str, dict[str, Any] | None, bool]] = [
    (f"{label} (dq weights)", {**kwargs, "config": {"float_weight_format": "dq"}}, static)
    for label, kwargs, static in VARIANTS + WEIGHT_ONLY
    if kwargs is not None and not str(kwargs["weights"]).startswith("hif8")
]


@dataclass(frozen=True)
class ModelCase:
    """One model: how to load it, its timing batch and its calibration batches."""

    name: str
    desc: str
    load: Callable[[], tuple[Any, dict[str, np.ndarray], list[dict[str, np.ndarray]]]]


def _demo() -> tuple[Any, dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    import onnx

    model = onnx.load(str(REPO / "models" / "digits_cnn.onnx"))
    calib = np.load(REPO / "models" / "digits_calib.npz")["input"][:64]
    held = np.load(REPO / "models" / "digits_heldout.npz")["input"]
    reps = -(-256 // len(held))
    feeds = {"input": np.ascontiguousarray(np.concatenate([held] * reps)[:256])}
    return model, feeds, [{"input": calib[i : i + 32]} for i in range(0, len(calib), 32)]


def _fetched(name: str, n: int, n_calib: int, **opts: Any) -> Callable[[], Any]:
    def load() -> tuple[Any, dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        import onnx

        from models.fetch import fetch, make_inputs

        model = onnx.load(str(fetch(name)))
        feeds = make_inputs(name, n, seed=1, **opts)
        cal = make_inputs(name, n_calib, seed=0, **opts)
        step = 2 if name == "ppocr_det" else 8
        calib = [{k: v[i : i + step] for k, v in cal.items()} for i in range(0, n_calib, step)]
        return model, feeds, calib

    return load


MODELS: dict[str, ModelCase] = {
    "demo": ModelCase("demo", "digits CNN (`models/digits_cnn.onnx`), batch 256 x 1 x 16 x 16", _demo),
    "ppocr_det": ModelCase("ppocr_det", "PP-OCRv6 small detector, 2 pages 480 x 640", _fetched("ppocr_det", 2, 4)),
    "minilm_l3": ModelCase("minilm_l3", "MiniLM-L3 sentence encoder, batch 32", _fetched("minilm_l3", 32, 32)),
    "ppocr_rec": ModelCase("ppocr_rec", "PP-OCRv6 small recognizer, 16 lines 48 x 320", _fetched("ppocr_rec", 16, 16)),
}


# --------------------------------------------------------------------------------------------
# Child jobs (fresh interpreters)
# --------------------------------------------------------------------------------------------


def _session(path: str, threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _feeds(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def child_memory(task: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of: import onnxruntime, load the inputs, build the session, run ``runs`` times."""
    feeds = _feeds(task["feeds"])
    session = _session(task["model"])
    before = common.vm_hwm_mb()
    times = []
    for _ in range(int(task["runs"])):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return {"hwm_before_run_mb": before, "run_ms": statistics.median(times)}


class _CpuTimed:
    """A session whose ``run`` also records the calling thread's CPU time (ms) of each call."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.cpu_ms: list[float] = []

    def run(self, outputs: Any, feeds: Any) -> Any:
        start = time.thread_time()
        result = self.session.run(outputs, feeds)
        self.cpu_ms.append((time.thread_time() - start) * 1e3)
        return result


def child_latency(task: dict[str, Any]) -> dict[str, Any]:
    """Median run time (wall and CPU) of every model in ``task["models"]``, timed round-robin (a
    model that fails to load or run gets its error instead)."""
    feeds = _feeds(task["feeds"])
    sessions, errors = [], []
    for path in task["models"]:
        try:
            session = _session(path)
            session.run(None, feeds)
            sessions.append(_CpuTimed(session))
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - report it on that row
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    warmup = 2
    stats = iter(
        common.interleaved_latency_stats(
            sessions, feeds, runs=int(task["runs"]), warmup=warmup, budget_s=float(task["budget_s"]), min_runs=5
        )
    )
    cpu = iter(statistics.median(s.cpu_ms[warmup:]) for s in sessions)
    medians, p10s, cpu_ms = [], [], []
    for err in errors:
        st = None if err else next(stats)
        medians.append(st.median if st else float("nan"))
        p10s.append(st.p10 if st else float("nan"))
        cpu_ms.append(float("nan") if err else next(cpu))
    return {"median_ms": medians, "p10_ms": p10s, "cpu_ms": cpu_ms, "errors": errors}


HANDLERS = {"memory": child_memory, "latency": child_latency}


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------


def quantize_variant(model: Any, kwargs: dict[str, Any], calib: list[dict[str, np.ndarray]] | None) -> Any:
    from onnxcomp.api import quantize

    return quantize(model, calibration=calib, **kwargs).model


_QUANTIZE_ELSEWHERE = """
import pickle, sys
checkout, job = sys.argv[1], sys.argv[2]
sys.path.insert(0, checkout)
from onnxcomp.api import quantize
with open(job, "rb") as f:
    model, kwargs, calib, out = pickle.load(f)
quantize(model, out, calibration=calib, force=True, **kwargs)
"""


def quantize_elsewhere(
    checkout: Path, model: Any, kwargs: dict[str, Any], calib: list[dict[str, np.ndarray]] | None, out: Path
) -> None:
    """``quantize`` with the onnxcomp of another checkout (``--before``), in a fresh interpreter."""
    import pickle
    import subprocess

    job = out.with_suffix(".job.pkl")
    with open(job, "wb") as f:
        pickle.dump((model, kwargs, calib, str(out)), f)
    done = subprocess.run(
        [sys.executable, "-c", _QUANTIZE_ELSEWHERE, str(checkout), str(job)], capture_output=True, text=True
    )
    job.unlink()
    if done.returncode:
        raise RuntimeError(f"quantize in {checkout}: {done.stderr.strip().splitlines()[-1]}")


def bench_model(case: ModelCase, variants: list[str], args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    import onnx

    model, feeds, calib = case.load()
    feeds_path = tmp / f"{case.name}_feeds.npz"
    np.savez(feeds_path, **feeds)
    rows: list[dict[str, Any]] = []
    paths: list[str] = []
    jobs = [(label, kwargs, static, None) for label, kwargs, static in VARIANTS + WEIGHT_ONLY + DQ_WEIGHTS]
    if args.before is not None:  # each variant also quantized by the other checkout, timed in the same run
        jobs += [
            (f"{label} (before)", kw, static, args.before) for label, kw, static, _ in jobs if kw and "config" not in kw
        ]
    for label, kwargs, static, checkout in jobs:
        if label.removesuffix(" (before)") not in variants:
            continue
        row: dict[str, Any] = {"model": case.name, "variant": label}
        path = tmp / f"{case.name}_{len(rows)}.onnx"
        try:
            start = time.perf_counter()
            if checkout is not None:
                quantize_elsewhere(checkout, model, kwargs or {}, calib if static else None, path)
                q = onnx.load(str(path))
            else:
                q = model if kwargs is None else quantize_variant(model, kwargs, calib if static else None)
                onnx.save(q, str(path))
            row["quantize_s"] = time.perf_counter() - start
            row["nodes"] = len(q.graph.node)
        except Exception as exc:  # noqa: BLE001 - keep the row, report the error
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
            continue
        mem = common.run_child(
            __file__, {"kind": "memory", "model": str(path), "feeds": str(feeds_path), "runs": args.mem_runs}
        )
        if mem.ok:
            row["peak_rss_mb"] = mem.hwm_mb
            row["hwm_before_run_mb"] = mem.result["hwm_before_run_mb"]
            row["run_delta_mb"] = mem.hwm_mb - mem.result["hwm_before_run_mb"]
        else:
            row["error"] = "memory run: " + mem.error
        row["path"] = str(path)
        paths.append(str(path))
        rows.append(row)
        print(f"  {case.name} / {label}: {json.dumps({k: v for k, v in row.items() if k != 'path'})}", flush=True)
    ok = [r for r in rows if "path" in r]
    lat = common.run_child(
        __file__,
        {
            "kind": "latency",
            "models": [r["path"] for r in ok],
            "feeds": str(feeds_path),
            "runs": args.runs,
            "budget_s": args.budget,
        },
        timeout=3600,
    )
    if lat.ok:
        for r, med, p10, cpu, err in zip(
            ok, lat.result["median_ms"], lat.result["p10_ms"], lat.result["cpu_ms"], lat.result["errors"]
        ):
            if err:
                r["error"] = r.get("error") or "latency: " + err
            else:
                r["median_ms"], r["p10_ms"], r["cpu_ms"] = med, p10, cpu
    else:
        for r in ok:
            r["error"] = "latency: " + lat.error
    base = next((r for r in rows if r["variant"] == "fp32"), None)
    for r in rows:
        if base is not None:
            for key, ratio in (
                ("peak_rss_mb", "rss_x"),
                ("run_delta_mb", "delta_x"),
                ("median_ms", "latency_x"),
                ("cpu_ms", "cpu_x"),
            ):
                if key in r and key in base and base[key] > 0:
                    r[ratio] = r[key] / base[key]
        r.pop("path", None)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["model", "variant", "peak RSS MiB", "x fp32", "run delta MiB", "x fp32", "median ms", "x fp32"]
    headers += ["CPU ms", "x fp32"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], r["variant"], "ERROR: " + r["error"]] + [""] * 7)
            continue
        body.append(
            [
                r["model"],
                r["variant"],
                common.fmt(r.get("peak_rss_mb"), 0),
                common.fmt(r.get("rss_x")),
                common.fmt(r.get("run_delta_mb"), 0),
                common.fmt(r.get("delta_x")),
                common.fmt(r.get("median_ms"), 1),
                common.fmt(r.get("latency_x")),
                common.fmt(r.get("cpu_ms"), 1),
                common.fmt(r.get("cpu_x")),
            ]
        )
    return common.markdown_table(headers, body, "llrrrrrrrr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS), help="comma-separated labels")
    parser.add_argument("--runs", type=int, default=15, help="latency rounds (at most)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed latency rounds per model")
    parser.add_argument("--mem-runs", type=int, default=2, help="runs in the peak-RSS process")
    parser.add_argument("--weight-only", action="store_true", help="also the weight-only variants (WEIGHT_ONLY)")
    parser.add_argument(
        "--dq-weights", action="store_true", help="also the DequantizeLinear-weight variants (DQ_WEIGHTS)"
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="CHECKOUT",
        help="also quantize every variant with the onnxcomp of this checkout (e.g. `git archive REV`), same run",
    )
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.weight_only:
        variants += [v[0] for v in WEIGHT_ONLY]
    if args.dq_weights:
        variants += [v[0] for v in DQ_WEIGHTS if v[0].split(" (")[0] in variants]
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-emulated-"))
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            case = MODELS[name]
            print(f"{name}: {case.desc}", flush=True)
            rows.extend(bench_model(case, variants, args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(common.environment_line(["numpy", "onnx", "onnxruntime"]) + f" Load average {common.load_average()}.")
    print()
    for name in dict.fromkeys(r["model"] for r in rows):
        print(f"- {name}: {MODELS[name].desc}")
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        common.child_main(HANDLERS)
    else:
        main()
