"""Post-training quantization: onnxcomp against onnxruntime.quantization, same data, matched settings.

Run from the repo root::

    .venv/bin/python bench/ptq.py           # 3.5 min on 2 cores (13 min with other jobs at load 10)
    .venv/bin/python bench/ptq.py --quick   # 2 min: smoke run, fewer samples, smaller inputs
    .venv/bin/python bench/ptq.py --full    # quantization time = median of 3 runs, 50 latency runs
    .venv/bin/python bench/ptq.py --only minilm_l3 --no-readme   # one model, print only
    .venv/bin/python bench/ptq.py --cost-only 3   # quantize time / peak RSS of the matched pairs (and the
                                                  # unmatched INT4 MSE row), medians of 3 interleaved rounds
    .venv/bin/python bench/ptq.py --cost-only 3 --only minilm_l3 --setting int4   # one setting
    .venv/bin/python bench/ptq.py --observer-cost ppocr_rec   # every observer's calibration time vs minmax

Models: the demo digits CNN (held-out top-1), ppocr_det (output cosine vs fp32 on held-out pages)
and minilm_l3 (sentence-embedding cosine vs fp32 over the corpus). For every model x setting x
tool it runs the quantization in a fresh subprocess (``bench/_common.py``: wall time measured in
the child around the quantization call, peak RSS = the child's VmHWM), then measures in this process
the output size, onnxruntime CPU latency (ORT_ENABLE_ALL, 1 and 2 threads, median of >= 20 runs
after 5 warm-up runs) and the task metric. A second part compares calibration alone (percentile
and entropy): onnxcomp's streaming ``Calibrator`` against ORT's ``create_calibrator().collect_data()
+ compute_data()`` on the same tensors and batches.

Matched settings: int8 weights symmetric per-channel, uint8 activations asymmetric per-tensor
(onnxcomp's default and ORT's ``QUInt8``), QDQ format, the ops Conv/ConvTranspose/Gemm/MatMul with a constant weight (ORT's activation x
activation MatMuls are excluded, as onnxcomp leaves them float), the same calibration samples in
the same batches. ORT's static and dynamic flows run its recommended ``quant_pre_process`` first
(``skip_symbolic_shape=True``: symbolic shape inference fails on both real models) and, for
opset < 13 models, ``onnx.version_converter`` to 13 (ORT per-channel QDQ needs it); both are
inside ORT's timed region, as onnxcomp's own fusions and opset upgrade are inside its. onnxcomp
otherwise runs at its defaults (placement speed: thin depthwise and small 1x1 convs stay float;
MatMul outputs stay float) with ``reports=False`` (no SQNR / fused-kernel report, which ORT does not
make either). The "defaults" row pairs each tool's default calibration: onnxcomp's histogram-error
observer and ORT's MinMax. INT4 weight-only (block 32) pairs round to nearest on the block amax on
both sides (onnxcomp ``--weight-observer minmax``, ``MatMulNBitsQuantizer``'s default); onnxcomp's
4-bit default, the MSE clipping search, is an unmatched row.

ORT's ``MatMulNBitsQuantizer`` imports ``onnx_ir`` (which needs ``sympy``); onnxruntime does not
declare them. If the venv lacks them, they are pip-installed (``--no-deps``, pinned) into a cache
folder of the user's cache (``$ONNXCOMP_BENCH_PEERS`` overrides it) and put
on ``PYTHONPATH`` of the ORT children only; the project venv is left untouched.

The result replaces the "## Post-training quantization" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _common as common  # noqa: E402 - after the sys.path insert

from onnxcomp.analysis.metrics import cosine, predict  # noqa: E402

README = REPO / "bench" / "README.md"
SECTION = "## Post-training quantization"
QUANT_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
PERCENTILE = 99.999  # ORT's default; onnxcomp is given the same value
PEER_PINS = ["onnx-ir==1.1.0", "sympy==1.14.0", "mpmath==1.3.0"]
LAT_WARMUP = 5


# ============================================================================================
# Child side: every quantization / calibration runs in a fresh interpreter
# ============================================================================================


def _imports(tool: str) -> None:
    """The imports a job of ``tool`` needs (the baseline child does exactly these)."""
    import onnx  # noqa: F401

    if tool == "onnxcomp":
        import onnxruntime  # noqa: F401 - onnxcomp imports it lazily; every job uses it

        import onnxcomp.api  # noqa: F401
        import onnxcomp.calibration.collect  # noqa: F401
        import onnxcomp.calibration.observers  # noqa: F401
        import onnxcomp.passes  # noqa: F401
        import onnxcomp.quant.apply  # noqa: F401
        import onnxcomp.quant.report  # noqa: F401
    else:
        import logging

        logging.disable(logging.INFO)  # MatMulNBitsQuantizer logs one line per node
        import onnxruntime.quantization  # noqa: F401
        import onnxruntime.quantization.calibrate  # noqa: F401
        import onnxruntime.quantization.shape_inference  # noqa: F401

        if tool == "ort_nbits":
            import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401


def _load_npz(path: str | None, n: int | None = None) -> dict[str, np.ndarray]:
    if not path:
        return {}
    with np.load(path) as data:
        return {k: np.ascontiguousarray(data[k][:n]) for k in data.files}


def _batches(data: dict[str, np.ndarray], bs: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(data.values())))
    return [{k: v[i : i + bs] for k, v in data.items()} for i in range(0, n, bs)]


def _ort_reader(data: dict[str, np.ndarray], bs: int):  # -> CalibrationDataReader
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = _batches(data, bs)
            self._it: Iterator[dict[str, np.ndarray]] = iter(self._batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def __len__(self) -> int:
            return len(self._batches)

        def rewind(self) -> None:
            self._it = iter(self._batches)

    return Reader()


def _act_act_matmuls(model: Any) -> list[str]:
    """MatMul nodes whose second input is not a constant (onnxcomp leaves them in float)."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in consts]


def _ort_prepare(src: str, pre_process: bool) -> str:
    """ORT's preparation (timed by the caller): opset >= 13 for per-channel QDQ, quant_pre_process."""
    import onnx
    from onnx import version_converter

    model = onnx.load(src)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    path = src
    if opset < 13:
        model = version_converter.convert_version(model, 13)
        path = "opset13.onnx"
        onnx.save(model, path)
    if pre_process:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(path, "preprocessed.onnx", skip_symbolic_shape=True)
        path = "preprocessed.onnx"
    return path


def child_baseline(task: dict[str, Any]) -> dict[str, Any]:
    """Imports + the model and calibration data loaded: what every job of that tool starts from."""
    import onnx

    _imports(task["tool"])
    model = onnx.load(task["model"])
    data = _load_npz(task.get("calib"), task.get("n"))
    return {"nodes": len(model.graph.node), "calib_arrays": len(data)}


def child_onnxcomp_quant(task: dict[str, Any]) -> dict[str, Any]:
    _imports("onnxcomp")
    import onnxcomp.api as api

    data: Any = _load_npz(task.get("calib"), task.get("n"))
    mode = task["mode"]
    start = time.perf_counter()
    if mode == "static":
        acts = {
            "dtype": "uint8",
            "granularity": "tensor",
            "symmetric": False,
            "observer": task["observer"],
            **task.get("observer_options", {}),
        }
        config = {
            "weights": {"dtype": "int8", "granularity": "channel", "symmetric": True, "observer": "minmax"},
            "activations": acts,
        }
        report = api.quantize(
            task["model"],
            task["out"],
            calibration=data,
            config=config,
            calib_samples=task["n"],
            batch_size=task["bs"],
            reports=False,
            force=True,
        )
    elif mode == "dynamic":
        report = api.quantize(
            task["model"],
            task["out"],
            weights="int8",
            granularity="channel",
            dynamic=True,
            dynamic_granularity=task.get("dynamic_granularity", "tensor"),
            reports=False,
            force=True,
        )
    elif mode == "int4":
        report = api.quantize(
            task["model"],
            task["out"],
            weights="int4",
            granularity="group:32",
            activations="none",
            weight_observer=task.get("weight_observer"),
            reports=False,
            force=True,
            validate=task.get("validate"),
        )
    else:
        raise ValueError(mode)
    elapsed = time.perf_counter() - start
    stats = report.result("quantize").stats
    return {"time_s": elapsed, "quantized_nodes": stats.get("nodes", 0)}


def child_ort_static(task: dict[str, Any]) -> dict[str, Any]:
    _imports("ort")
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    data = _load_npz(task["calib"], task["n"])
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[task["observer"]]
    extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if task["observer"] == "percentile":
        extra["CalibPercentile"] = task["observer_options"]["percentile"]
    start = time.perf_counter()
    src = _ort_prepare(task["model"], pre_process=True)
    exclude = _act_act_matmuls(onnx.load(src, load_external_data=False))
    quantize_static(
        src,
        task["out"],
        _ort_reader(data, task["bs"]),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANT_OPS,
        per_channel=True,
        reduce_range=False,
        activation_type=QuantType.QUInt8 if task.get("act_dtype", "uint8") == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        calibrate_method=method,
        extra_options=extra,
    )
    return {"time_s": time.perf_counter() - start, "excluded": len(exclude)}


def child_ort_dynamic(task: dict[str, Any]) -> dict[str, Any]:
    _imports("ort")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    src = _ort_prepare(task["model"], pre_process=True)
    exclude = _act_act_matmuls(onnx.load(src, load_external_data=False))
    quantize_dynamic(
        src,
        task["out"],
        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
    )
    return {"time_s": time.perf_counter() - start, "excluded": len(exclude)}


def child_ort_nbits(task: dict[str, Any]) -> dict[str, Any]:
    """ORT's MatMulNBitsQuantizer, 4-bit symmetric blocks of ``block`` (32): its default RTN,
    ``algorithm: k_quant`` or ``algorithm: gptq``: its GPTQ (needs torch) (``GPTQWeightOnlyQuantConfig`` on the calibration batches,
    ``act_order``, ``damp``)."""
    _imports("ort_nbits")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    algo_config: Any = None
    if task.get("algorithm", "rtn") == "k_quant":
        from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig

        algo_config = KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    elif task.get("algorithm", "rtn") == "gptq":
        data = _load_npz(task["calib"], task["n"])
        algo_config = GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_ort_reader(data, task["bs"]),
            percdamp=task.get("damp", 0.01),
            actorder=bool(task.get("act_order", False)),
            op_types_to_quantize=("MatMul",),
        )
    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(
        onnx.load(task["model"]),
        bits=4,
        block_size=task.get("block", 32),
        is_symmetric=True,
        accuracy_level=task.get("accuracy_level"),
        op_types_to_quantize=("MatMul",),
        algo_config=algo_config,
    )
    quantizer.process()
    quantizer.model.save_model_to_file(task["out"], False)
    return {"time_s": time.perf_counter() - start}


def child_ort_calib(task: dict[str, Any]) -> dict[str, Any]:
    """ORT calibration alone: create_calibrator + collect_data + compute_data."""
    _imports("ort")
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    data = _load_npz(task["calib"], task["n"])
    method = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[task["policy"]]
    start = time.perf_counter()
    calibrator = create_calibrator(
        task["model"],
        QUANT_OPS,
        augmented_model_path="augmented.onnx",
        calibrate_method=method,
        extra_options=task.get("ort_options", {}),
    )
    calibrator.collect_data(_ort_reader(data, task["bs"]))
    ranges = calibrator.compute_data()
    elapsed = time.perf_counter() - start
    tensors = sorted(calibrator.tensors_to_calibrate)
    return {"time_s": elapsed, "tensors": tensors, "ranges": len(ranges.data)}


def child_onnxcomp_calib(task: dict[str, Any]) -> dict[str, Any]:
    """onnxcomp calibration alone: Calibrator.run + compute_range, on the tensors ORT picked."""
    _imports("onnxcomp")
    from functools import partial

    import onnx

    from onnxcomp.calibration.collect import Calibrator
    from onnxcomp.calibration.observers import compute_range, make_observer

    data = _load_npz(task["calib"], task["n"])
    policy, options = task["policy"], task.get("oc_options", {})
    start = time.perf_counter()
    model = onnx.load(task["model"])
    factory = partial(make_observer, policy, **options)
    observers = Calibrator(model, {t: factory for t in task["tensors"]}).run(_batches(data, task["bs"]))
    ranges = {name: compute_range(policy, obs, None, False, **options) for name, obs in observers.items()}
    return {"time_s": time.perf_counter() - start, "ranges": len(ranges)}


HANDLERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "baseline": child_baseline,
    "onnxcomp_quant": child_onnxcomp_quant,
    "ort_static": child_ort_static,
    "ort_dynamic": child_ort_dynamic,
    "ort_nbits": child_ort_nbits,
    "ort_calib": child_ort_calib,
    "onnxcomp_calib": child_onnxcomp_calib,
}


# ============================================================================================
# Parent side
# ============================================================================================


@dataclass
class Job:
    setting: str  # row label, e.g. "static int8, minmax"
    tool: str  # "onnxcomp" | "onnxruntime" | ...
    task: dict[str, Any]
    env_tool: str  # which baseline it belongs to: onnxcomp | ort | ort_nbits
    matched: bool = True  # part of a matched onnxcomp-vs-ORT pair
    note: str = ""
    in_costs: bool = False  # an unmatched job ``--cost-only`` runs too (its row is printed, not paired)


@dataclass
class Row:
    setting: str
    tool: str
    time_s: float = float("nan")
    peak_mb: float = float("nan")
    above_mb: float = float("nan")
    size_mb: float = float("nan")
    lat1: float = float("nan")
    lat2: float = float("nan")
    metric: float = float("nan")
    metric2: float = float("nan")
    error: str = ""
    matched: bool = True
    note: str = ""


@dataclass
class ModelBench:
    key: str
    title: str
    src: str
    calib: str  # .npz the children load
    n: int  # calibration samples
    bs: int  # calibration batch size
    calib_text: str
    eval_text: str
    latency_feeds: dict[str, np.ndarray]
    latency_text: str
    metric_name: str
    metric2_name: str
    evaluate: Callable[[str], tuple[float, float]]  # model path -> (metric, metric2)
    higher_better: bool = True
    jobs: list[Job] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    baselines: dict[str, float] = field(default_factory=dict)


def _peer_env() -> dict[str, str]:
    """PYTHONPATH for ORT children: onnx_ir + sympy for MatMulNBitsQuantizer (see module doc)."""
    if importlib.util.find_spec("onnx_ir") and importlib.util.find_spec("sympy"):
        return {}
    target = Path(os.environ.get("ONNXCOMP_BENCH_PEERS", Path.home() / ".cache" / "onnxcomp-bench" / "peers"))
    stamp = target / (".installed-" + "-".join(p.replace("==", "_") for p in PEER_PINS))
    if not stamp.exists():
        print(f"installing {', '.join(PEER_PINS)} into {target} (for ORT's MatMulNBitsQuantizer only)", flush=True)
        shutil.rmtree(target, ignore_errors=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *PEER_PINS],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print("  pip failed; the MatMulNBits rows will be missing:", done.stderr.strip().splitlines()[-1:])
            return {}
        stamp.touch()
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(target) + (os.pathsep + old if old else "")}


def _session_outputs(path: str, feeds: dict[str, np.ndarray], names: list[str] | None, batch: int) -> np.ndarray:
    return predict(common.as_proto(path), feeds, batch=batch, output=names[0] if names else None, threads=2)


def _cos_flat(a: np.ndarray, b: np.ndarray) -> float:
    return cosine(a, b)


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def build_models(work: Path, quick: bool) -> list[ModelBench]:
    from models.fetch import MODELS, fetch, make_inputs

    benches: list[ModelBench] = []

    # ---- 1. demo digits CNN -----------------------------------------------------------------
    src = str(REPO / "models" / "digits_cnn.onnx")
    held = dict(np.load(REPO / "models" / "digits_heldout.npz"))
    ref_logits = _session_outputs(src, {"input": held["input"]}, None, 540)

    def eval_digits(path: str) -> tuple[float, float]:
        logits = _session_outputs(path, {"input": held["input"]}, None, 540)
        return float((logits.argmax(1) == held["label"]).mean() * 100), _cos_flat(ref_logits, logits)

    benches.append(
        ModelBench(
            key="digits_cnn",
            title="Demo model `models/digits_cnn.onnx`",
            src=src,
            calib=str(REPO / "models" / "digits_calib.npz"),
            n=128,
            bs=16,
            calib_text="`digits_calib.npz`, all 128 samples, batches of 16",
            eval_text="held-out top-1 accuracy on the 540 images of `digits_heldout.npz` "
            "(1 image = 0.19 points); second metric: cosine of the logits vs fp32",
            latency_feeds={"input": held["input"][:64]},
            latency_text="a batch of 64 images [64,1,16,16]",
            metric_name="top-1 %",
            metric2_name="logits cos",
            evaluate=eval_digits,
        )
    )

    # ---- 2. ppocr_det CNN -----------------------------------------------------------------------
    det = str(fetch("ppocr_det"))
    side = 192 if quick else 320
    n_cal, n_eval = (8, 4) if quick else (16, 8)
    cal = make_inputs("ppocr_det", n_cal, seed=1, height=side, width=side)
    np.savez(work / "calib_ppocr_det.npz", **cal)
    held_det = make_inputs("ppocr_det", n_eval, seed=2, height=side, width=side)
    det_out = MODELS["ppocr_det"]["primary_output"]
    ref_det = _session_outputs(det, held_det, [det_out], 4)

    def eval_det(path: str) -> tuple[float, float]:
        out = _session_outputs(path, held_det, [det_out], 4)
        return _cos_flat(ref_det, out), float(np.abs(out - ref_det).mean())

    benches.append(
        ModelBench(
            key="ppocr_det",
            title="Real CNN `ppocr_det` (PP-OCRv6 small text detector, opset 11)",
            src=det,
            calib=str(work / "calib_ppocr_det.npz"),
            n=n_cal,
            bs=4,
            calib_text=f"{n_cal} synthetic pages `make_inputs('ppocr_det', {n_cal}, seed=1)` at {side}x{side}, batches of 4",
            eval_text=f"cosine of the probability map `{det_out}` vs fp32 over {n_eval} held-out pages (seed=2, "
            f"{side}x{side}); second metric: mean |p - p_fp32|",
            latency_feeds={"x": held_det["x"][:1]},
            latency_text=f"one page [1,3,{side},{side}]",
            metric_name="cos vs fp32",
            metric2_name="mean abs err",
            evaluate=eval_det,
            higher_better=True,
        )
    )

    # ---- 3. minilm_l3 transformer -------------------------------------------------------------
    lm = str(fetch("minilm_l3"))
    corpus = make_inputs("minilm_l3", 64, seed=0)  # the 64 corpus sentences (32 paraphrase pairs)
    np.savez(work / "calib_minilm_l3.npz", **corpus)
    lm_out = MODELS["minilm_l3"]["primary_output"]
    ref_lm = _session_outputs(lm, corpus, [lm_out], 64)

    def eval_lm(path: str) -> tuple[float, float]:
        cos = _cos_rows(ref_lm, _session_outputs(path, corpus, [lm_out], 64))
        return float(cos.mean()), float(cos.min())

    seq = corpus["input_ids"].shape[1]
    lm_batch = 4 if quick else 16
    benches.append(
        ModelBench(
            key="minilm_l3",
            title="Transformer encoder `minilm_l3` (paraphrase-MiniLM-L3-v2)",
            src=lm,
            calib=str(work / "calib_minilm_l3.npz"),
            n=64,
            bs=16,
            calib_text=f"the 64 corpus sentences `make_inputs('minilm_l3', 64, seed=0)` (padded to {seq} tokens), "
            "batches of 16",
            eval_text=f"mean cosine of the sentence embedding `{lm_out}` vs fp32 over the same 64 sentences; "
            "second metric: the minimum over the sentences",
            latency_feeds={k: v[:lm_batch] for k, v in corpus.items()},
            latency_text=f"{lm_batch} sentences [{lm_batch},{seq}]",
            metric_name="mean cos",
            metric2_name="min cos",
            evaluate=eval_lm,
        )
    )
    return benches


def plan_jobs(bench: ModelBench, work: Path, have_nbits: bool, quick: bool) -> None:
    def out(name: str) -> str:
        return str(work / f"{bench.key}.{name}.onnx")

    common_task = {"model": bench.src, "calib": bench.calib, "n": bench.n, "bs": bench.bs}
    bench.jobs.append(
        Job(
            "static, defaults",
            "onnxcomp",
            {
                **common_task,
                "kind": "onnxcomp_quant",
                "mode": "static",
                "observer": "histogram",
                "out": out("oc_default"),
            },
            "onnxcomp",
            note="onnxcomp's default activation observer: histogram (range minimizing the quantization error)",
        )
    )
    bench.jobs.append(
        Job(
            "static, defaults",
            "onnxruntime",
            {**common_task, "kind": "ort_static", "observer": "minmax", "out": out("ort_default")},
            "ort",
            note="ORT's default calibration method: MinMax (the same job as its minmax row, run again)",
        )
    )
    observers = ("minmax", "entropy") if quick and bench.key != "digits_cnn" else ("minmax", "percentile", "entropy")
    for obs in observers:
        opts = {"percentile": PERCENTILE} if obs == "percentile" else {}
        label = f"static, {obs}" + (f" {PERCENTILE:g}" if obs == "percentile" else "")
        bench.jobs.append(
            Job(
                label,
                "onnxcomp",
                {
                    **common_task,
                    "kind": "onnxcomp_quant",
                    "mode": "static",
                    "observer": obs,
                    "observer_options": opts,
                    "out": out(f"oc_{obs}"),
                },
                "onnxcomp",
            )
        )
        bench.jobs.append(
            Job(
                label,
                "onnxruntime",
                {
                    **common_task,
                    "kind": "ort_static",
                    "observer": obs,
                    "observer_options": opts,
                    "out": out(f"ort_{obs}"),
                },
                "ort",
            )
        )
    if bench.key != "minilm_l3":
        return
    nocal = {"model": bench.src}
    bench.jobs.append(
        Job(
            "dynamic int8 (W per-channel)",
            "onnxcomp",
            {**nocal, "kind": "onnxcomp_quant", "mode": "dynamic", "out": out("oc_dynamic")},
            "onnxcomp",
            note="`dynamic_granularity='tensor'`: per-tensor uint8 activations (ORT's fused integer kernels)",
        )
    )
    if not quick:
        bench.jobs.append(
            Job(
                "dynamic int8 (W per-channel)",
                "onnxcomp per-token",
                {
                    **nocal,
                    "kind": "onnxcomp_quant",
                    "mode": "dynamic",
                    "dynamic_granularity": "token",
                    "out": out("oc_dynamic_token"),
                },
                "onnxcomp",
                matched=False,
                note="onnxcomp's API default `dynamic_granularity='token'`: one symmetric scale per row, "
                "emulated in float ops (more accurate, slower)",
            )
        )
    bench.jobs.append(
        Job(
            "dynamic int8 (W per-channel)",
            "onnxruntime",
            {**nocal, "kind": "ort_dynamic", "out": out("ort_dynamic")},
            "ort",
            note="per-tensor uint8 activations (the only dynamic form ORT has)",
        )
    )
    # The matched INT4 pair: round-to-nearest with the per-block amax scale on both sides
    # (onnxcomp's --weight-observer minmax; ORT's MatMulNBitsQuantizer default). onnxcomp's 4-bit
    # default (an MSE clipping search over 41 ratios) is kept as an unmatched row.
    bench.jobs.append(
        Job(
            "int4 weight-only, block 32",
            "onnxcomp",
            {**nocal, "kind": "onnxcomp_quant", "mode": "int4", "weight_observer": "minmax", "out": out("oc_int4")},
            "onnxcomp",
            note="`--weight-observer minmax`: round to nearest on the block's amax scale, as ORT's default; "
            "written as MatMulNBits (accuracy level 4)",
        )
    )
    bench.jobs.append(
        Job(
            "int4 weight-only, block 32",
            "onnxcomp --validate none",
            {
                **nocal,
                "kind": "onnxcomp_quant",
                "mode": "int4",
                "weight_observer": "minmax",
                "validate": "none",
                "out": out("oc_int4_unchecked"),
            },
            "onnxcomp",
            matched=False,
            in_costs=True,
            note="the matched row without onnx.checker, the reference run and the session over the output, "
            "none of which ORT's quantizer runs",
        )
    )
    if have_nbits:
        bench.jobs.append(
            Job(
                "int4 weight-only, block 32",
                "onnxruntime",
                {**nocal, "kind": "ort_nbits", "out": out("ort_nbits")},
                "ort_nbits",
                note="MatMulNBits, round to nearest (its default), accuracy_level unset",
            )
        )
        if not quick:
            bench.jobs.append(
                Job(
                    "int4 weight-only, block 32",
                    "onnxruntime acc=4",
                    {**nocal, "kind": "ort_nbits", "accuracy_level": 4, "out": out("ort_nbits4")},
                    "ort_nbits",
                    note="MatMulNBits, accuracy_level=4 (as onnxcomp's fused output)",
                )
            )
    bench.jobs.append(
        Job(
            "int4 weight-only, block 32",
            "onnxcomp mse",
            {**nocal, "kind": "onnxcomp_quant", "mode": "int4", "out": out("oc_int4_mse")},
            "onnxcomp",
            matched=False,
            in_costs=True,
            note="onnxcomp's 4-bit default: the MSE clipping search (41 ratios of amax per block) instead of "
            "the plain amax rule",
        )
    )


def run_bench(
    bench: ModelBench, repeats: int, lat_runs: int, peer_env: dict[str, str], log: Callable[[str], None]
) -> None:
    # baselines: one per tool environment
    for env_tool in sorted({j.env_tool for j in bench.jobs}):
        tool = {"onnxcomp": "onnxcomp", "ort": "ort", "ort_nbits": "ort_nbits"}[env_tool]
        res = common.run_child(
            __file__,
            {"kind": "baseline", "tool": tool, "model": bench.src, "calib": bench.calib, "n": bench.n},
            env=peer_env if env_tool != "onnxcomp" else None,
        )
        bench.baselines[env_tool] = res.peak_rss_mb if res.ok else float("nan")
        log(f"  baseline {env_tool}: {res.peak_rss_mb:.0f} MB" + ("" if res.ok else f" FAILED {res.error}"))
    # fp32 reference row
    m1, m2 = bench.evaluate(bench.src)
    fp32 = Row("fp32 (reference)", "-", size_mb=os.path.getsize(bench.src) / 1e6, metric=m1, metric2=m2, matched=False)
    bench.rows.append(fp32)
    paths = {id(fp32): bench.src}
    for job in bench.jobs:
        row = Row(job.setting, job.tool, matched=job.matched, note=job.note)
        times, peaks = [], []
        for _ in range(repeats):
            res = common.run_child(__file__, job.task, env=peer_env if job.env_tool != "onnxcomp" else None)
            if not res.ok:
                row.error = res.error
                break
            times.append(res.result["time_s"])
            peaks.append(res.peak_rss_mb)
        if row.error:
            log(f"  {job.setting} / {job.tool}: FAILED {row.error}")
            bench.rows.append(row)
            continue
        row.time_s, row.peak_mb = statistics.median(times), statistics.median(peaks)
        row.above_mb = row.peak_mb - bench.baselines.get(job.env_tool, float("nan"))
        path = job.task["out"]
        row.size_mb = os.path.getsize(path) / 1e6
        row.metric, row.metric2 = bench.evaluate(path)
        bench.rows.append(row)
        paths[id(row)] = path
        log(
            f"  {job.setting:32s} {job.tool:18s} {row.time_s:6.2f} s {row.peak_mb:6.0f} MB "
            f"{row.size_mb:6.2f} MB  {bench.metric_name} {row.metric:.5f}"
        )
    # latency: all models of this benchmark round-robin, per thread count
    timed = [r for r in bench.rows if id(r) in paths]
    for threads, attr in ((1, "lat1"), (2, "lat2")):
        lats = common.interleaved_latency_ms(
            [paths[id(r)] for r in timed], bench.latency_feeds, threads, lat_runs, LAT_WARMUP
        )
        for r, ms in zip(timed, lats, strict=True):
            setattr(r, attr, ms)
    log("  latency ms (1T/2T): " + ", ".join(f"{r.tool}:{r.lat1:.2f}/{r.lat2:.2f}" for r in timed))


def run_costs(
    bench: ModelBench,
    repeats: int,
    peer_env: dict[str, str],
    log: Callable[[str], None],
    settings: list[str] | None = None,
) -> None:
    """``--cost-only``: quantize wall time and peak RSS of the matched jobs (and the unmatched ones
    marked ``in_costs``; no metric, no latency), in ``repeats`` interleaved rounds (every job once
    per round, each pair back to back), so that load from other processes hits both tools alike; the
    rows hold the medians. ``settings``: only the jobs whose setting contains one of these strings."""
    chosen = [
        j for j in bench.jobs if (j.matched or j.in_costs) and (not settings or any(s in j.setting for s in settings))
    ]
    for env_tool in sorted({j.env_tool for j in chosen}):
        res = common.run_child(
            __file__,
            {"kind": "baseline", "tool": env_tool, "model": bench.src, "calib": bench.calib, "n": bench.n},
            env=peer_env if env_tool != "onnxcomp" else None,
        )
        bench.baselines[env_tool] = res.peak_rss_mb if res.ok else float("nan")
    jobs = chosen
    runs: dict[int, list[tuple[float, float]]] = {id(j): [] for j in jobs}
    errors: dict[int, str] = {}
    for round_ in range(repeats):
        for job in jobs:
            if id(job) in errors:
                continue
            res = common.run_child(__file__, job.task, env=peer_env if job.env_tool != "onnxcomp" else None)
            if res.ok:
                runs[id(job)].append((res.result["time_s"], res.peak_rss_mb))
            else:
                errors[id(job)] = res.error
        log(f"  round {round_ + 1}/{repeats} done")
    for job in jobs:
        row = Row(job.setting, job.tool, matched=job.matched, note=job.note, error=errors.get(id(job), ""))
        if runs[id(job)]:
            row.time_s = statistics.median(t for t, _ in runs[id(job)])
            row.peak_mb = statistics.median(m for _, m in runs[id(job)])
            row.above_mb = row.peak_mb - bench.baselines.get(job.env_tool, float("nan"))
        log(f"  {job.setting:32s} {job.tool:18s} {row.time_s:6.2f} s {row.peak_mb:6.0f} MB {row.error}")
        bench.rows.append(row)


#: ``--observer-cost``: calibration data per model (samples, batch size), as in the sections above.
OBSERVER_DATA = {"ppocr_rec": (32, 8), "minilm_l3": (64, 16), "ppocr_det": (8, 4), "digits_cnn": (128, 16)}
OBSERVERS = ("minmax", "histogram", "percentile", "entropy", "mse")


def observer_costs(key: str, rounds: int, log: Callable[[str], None]) -> str:
    """Calibration time of every observer on ``key`` (the inputs of its Conv/MatMul/Gemm nodes,
    uint8 asymmetric ranges): ``Calibrator.run`` + ``compute_range``, in-process, ``rounds``
    interleaved rounds (every observer once per round); a markdown table of the medians."""
    from functools import partial

    import onnx

    from models.fetch import fetch, make_inputs
    from onnxcomp.calibration.collect import Calibrator
    from onnxcomp.calibration.observers import compute_range, make_observer
    from onnxcomp.quant.qparams import range_qdq

    samples, bs = OBSERVER_DATA[key]
    if key == "digits_cnn":
        path, data = str(REPO / "models" / "digits_cnn.onnx"), dict(np.load(REPO / "models" / "digits_calib.npz"))
    else:
        path, data = str(fetch(key)), make_inputs(key, samples, seed=3)
    model = onnx.load(path)
    weights = {t.name for t in model.graph.initializer}
    ops = ("Conv", "MatMul", "Gemm")
    tensors = sorted({n.input[0] for n in model.graph.node if n.op_type in ops and n.input[0] not in weights})
    batches = _batches(data, bs)
    qdq = range_qdq("uint8", False)
    times: dict[str, list[tuple[float, float]]] = {p: [] for p in OBSERVERS}
    for round_ in range(rounds):
        for policy in OBSERVERS:
            start = time.perf_counter()
            found = Calibrator(model, {t: partial(make_observer, policy) for t in tensors}).run(batches)
            collected = time.perf_counter()
            for observer in found.values():
                compute_range(policy, observer, qdq, False)
            times[policy].append((time.perf_counter() - start, collected - start))
        log(f"  {key}: round {round_ + 1}/{rounds} done")
    base = statistics.median(t for t, _ in times["minmax"])
    rows = []
    for policy in OBSERVERS:
        total = statistics.median(t for t, _ in times[policy])
        collect = statistics.median(c for _, c in times[policy])
        rows.append(
            [
                policy,
                common.fmt(total, 2),
                common.fmt(collect, 2),
                common.fmt(total - collect, 2),
                f"{total / base:.2f}",
            ]
        )
    headers = ["observer", "calibration s", "collect s", "ranges s", "x minmax"]
    title = f"{key}: {len(tensors)} tensors, {samples} samples in batches of {bs}"
    return f"{title}\n\n{common.markdown_table(headers, rows, 'lrrrr')}"


# ---- calibration-only comparison ------------------------------------------------------------


@dataclass
class CalibRow:
    model: str
    policy: str
    samples: int
    tensors: int
    oc_time: float = float("nan")
    ort_time: float = float("nan")
    oc_peak: float = float("nan")
    ort_peak: float = float("nan")
    oc_base: float = float("nan")
    ort_base: float = float("nan")
    error: str = ""


def run_calibration_only(work: Path, quick: bool, log: Callable[[str], None]) -> tuple[list[CalibRow], dict[str, str]]:
    from models.fetch import fetch, make_inputs

    specs = []
    n_lm = 64 if quick else 256
    lm = make_inputs("minilm_l3", n_lm, seed=3)
    np.savez(work / "calonly_minilm.npz", **lm)
    specs.append(
        (
            "minilm_l3",
            str(fetch("minilm_l3")),
            str(work / "calonly_minilm.npz"),
            n_lm,
            16,
            f"{n_lm} sentences (the corpus + joined pairs, seed=3) padded to {lm['input_ids'].shape[1]} tokens, "
            "batches of 16",
        )
    )
    if not quick:
        n_det, side = 32, 320
        det = make_inputs("ppocr_det", n_det, seed=4, height=side, width=side)
        np.savez(work / "calonly_det.npz", **det)
        specs.append(
            (
                "ppocr_det",
                str(fetch("ppocr_det")),
                str(work / "calonly_det.npz"),
                n_det,
                4,
                f"{n_det} pages at {side}x{side} (seed=4), batches of 4",
            )
        )
    settings = {
        "percentile": ({"percentile": PERCENTILE, "num_bins": 2048}, {"percentile": PERCENTILE, "num_bins": 2048}),
        "entropy": ({}, {"num_bins": 2048, "num_quant_bins": 128}),
    }
    rows, texts = [], {}
    for key, model, npz, n, bs, text in specs:
        texts[key] = text
        base = {"model": model, "calib": npz, "n": n}
        ort_base = common.run_child(__file__, {**base, "kind": "baseline", "tool": "ort"})
        oc_base = common.run_child(__file__, {**base, "kind": "baseline", "tool": "onnxcomp"})
        for policy, (ort_opts, oc_opts) in settings.items():
            ort = common.run_child(
                __file__,
                {**base, "kind": "ort_calib", "policy": policy, "bs": bs, "ort_options": ort_opts},
                timeout=900,
            )
            tensors = ort.result.get("tensors", []) if ort.ok else []
            row = CalibRow(key, policy, n, len(tensors), ort_base=ort_base.peak_rss_mb, oc_base=oc_base.peak_rss_mb)
            if not ort.ok:
                row.error = f"ORT: {ort.error}"
            else:
                row.ort_time, row.ort_peak = ort.result["time_s"], ort.peak_rss_mb
                oc = common.run_child(
                    __file__,
                    {
                        **base,
                        "kind": "onnxcomp_calib",
                        "policy": policy,
                        "bs": bs,
                        "tensors": tensors,
                        "oc_options": oc_opts,
                    },
                    timeout=900,
                )
                if oc.ok:
                    row.oc_time, row.oc_peak = oc.result["time_s"], oc.peak_rss_mb
                else:
                    row.error = f"onnxcomp: {oc.error}"
            rows.append(row)
            log(
                f"  calib {key} {policy}: onnxcomp {row.oc_time:.2f} s {row.oc_peak:.0f} MB | "
                f"ORT {row.ort_time:.2f} s {row.ort_peak:.0f} MB {row.error}"
            )
    return rows, texts


# ---- report ---------------------------------------------------------------------------------


def _pairs(bench: ModelBench) -> list[tuple[Row, Row]]:
    """(onnxcomp row, ORT row) of each matched setting."""
    out = []
    for row in bench.rows:
        if row.tool != "onnxcomp" or not row.matched or row.error:
            continue
        for other in bench.rows:
            if other.setting == row.setting and other.tool.startswith("onnxruntime") and not other.error:
                out.append((row, other))
    return out


def model_table(bench: ModelBench) -> str:
    d1, d2 = (2, 5) if bench.key == "digits_cnn" else (5, 5)
    headers = [
        "setting",
        "tool",
        "quant time s",
        "peak RSS MB",
        "above baseline MB",
        "size MB",
        "latency 1T ms",
        "latency 2T ms",
        bench.metric_name,
        bench.metric2_name,
    ]
    rows = []
    for r in bench.rows:
        tool = r.tool + ("" if r.matched or r.tool == "-" else " *")
        if r.error:
            rows.append([r.setting, tool, f"failed: {r.error}"] + ["-"] * 7)
            continue
        rows.append(
            [
                r.setting,
                tool,
                common.fmt(r.time_s),
                common.fmt(r.peak_mb, 0),
                common.fmt(r.above_mb, 0),
                common.fmt(r.size_mb, 3),
                common.fmt(r.lat1),
                common.fmt(r.lat2),
                common.fmt(r.metric, d1),
                common.fmt(r.metric2, d2),
            ]
        )
    return common.markdown_table(headers, rows, "llrrrrrrrr")


def _ratio_range(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}x"


def _med_range(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.2f}" if len(values) == 1 else f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def cost_table(benches: list[ModelBench]) -> str:
    """Quantize wall time and peak RSS of onnxcomp against ORT over the matched pairs: medians of the
    per-pair values and of the per-pair ratios (min-max in brackets), per model and over all models."""
    headers = [
        "model",
        "matched pairs",
        "onnxcomp time s",
        "ORT time s",
        "time oc/ORT",
        "onnxcomp peak MB",
        "ORT peak MB",
        "peak RSS oc/ORT",
        "above baseline oc/ORT",
    ]
    rows = []
    everything: list[tuple[Row, Row]] = []
    for b in benches:
        pairs = [(oc, ort) for oc, ort in _pairs(b) if ort.tool == "onnxruntime"]
        everything += pairs
        if not pairs:
            continue
        rows.append(_cost_row(b.key, pairs))
    if len(benches) > 1 and everything:
        rows.append(_cost_row("all models", everything))
    return common.markdown_table(headers, rows, "lrrrrrrrr")


def cost_jobs_table(benches: list[ModelBench]) -> str:
    """Every job ``--cost-only`` ran: median time and peak RSS (unmatched ones marked *)."""
    headers = ["model", "setting", "tool", "time s", "peak MB", "above baseline MB"]
    rows = [
        [
            b.key,
            r.setting,
            r.tool + ("" if r.matched else " *"),
            common.fmt(r.time_s, 2),
            common.fmt(r.peak_mb, 0),
            common.fmt(r.above_mb, 0),
        ]
        for b in benches
        for r in b.rows
    ]
    return common.markdown_table(headers, rows, "lllrrr")


def _cost_row(name: str, pairs: list[tuple[Row, Row]]) -> list[str]:
    def med(values: list[float], digits: int) -> str:
        values = [v for v in values if v == v]
        return common.fmt(statistics.median(values), digits) if values else "-"

    return [
        name,
        str(len(pairs)),
        med([oc.time_s for oc, _ in pairs], 2),
        med([ort.time_s for _, ort in pairs], 2),
        _med_range([oc.time_s / ort.time_s for oc, ort in pairs]),
        med([oc.peak_mb for oc, _ in pairs], 0),
        med([ort.peak_mb for _, ort in pairs], 0),
        _med_range([oc.peak_mb / ort.peak_mb for oc, ort in pairs]),
        _med_range([oc.above_mb / ort.above_mb for oc, ort in pairs if ort.above_mb > 0]),
    ]


def summary(benches: list[ModelBench], cal_rows: list[CalibRow]) -> tuple[str, list[str]]:
    """Plain per-model statements of where onnxcomp is better/worse, and the list of metric losses."""
    losses: list[str] = []
    lines = []
    for b in benches:
        pairs = _pairs(b)
        if not pairs:
            continue
        tol = 1e-9 if b.key == "digits_cnn" else 5e-5
        better: list[str] = []
        equal: list[str] = []
        worse: list[str] = []
        for oc, ort in pairs:
            d = oc.metric - ort.metric
            what = f"{oc.setting} vs {ort.tool}: {oc.metric:.5g} vs {ort.metric:.5g} ({d:+.2g})"
            (worse if d < -tol else better if d > tol else equal).append(what)
            if d < -tol:
                losses.append(f"{b.key} {what} [{b.metric_name}]")
        main = [(oc, ort) for oc, ort in pairs if ort.tool == "onnxruntime"]
        text = (
            f"- **{b.key}** ({b.metric_name}): onnxcomp better in {len(better)}, equal in {len(equal)}, "
            f"worse in {len(worse)} of {len(pairs)} matched pairs"
        )
        details = [f"better: {'; '.join(better)}" if better else "", f"worse: {'; '.join(worse)}" if worse else ""]
        details = [d for d in details if d]
        text += (" (" + " / ".join(details) + ")") if details else ""
        text += (
            f". onnxcomp's quantization takes {_ratio_range([oc.time_s / ort.time_s for oc, ort in main])} "
            f"ORT's time and {_ratio_range([oc.peak_mb / ort.peak_mb for oc, ort in main])} its peak RSS; "
            f"its output is {_ratio_range([oc.size_mb / ort.size_mb for oc, ort in main])} the size; "
            f"its model's latency is {_ratio_range([oc.lat1 / ort.lat1 for oc, ort in main])} ORT's model's "
            f"with 1 thread and {_ratio_range([oc.lat2 / ort.lat2 for oc, ort in main])} with 2 threads "
            "(ratios onnxcomp / ORT, < 1 means onnxcomp is smaller or faster)."
        )
        lines.append(text)
    cal_ok = [r for r in cal_rows if not r.error]
    if cal_ok:
        t = [
            f"{r.model} {r.policy} {r.oc_time / r.ort_time:.2f}x the time and {r.oc_peak / r.ort_peak:.2f}x the "
            "peak RSS"
            for r in cal_ok
        ]
        lines.append("- **Calibration alone** (onnxcomp / ORT, same tensors and batches): " + "; ".join(t) + ".")
    return "\n".join(lines), losses


def render(
    benches: list[ModelBench],
    cal_rows: list[CalibRow],
    cal_texts: dict[str, str],
    args: argparse.Namespace,
    repeats: int,
    lat_runs: int,
    runtime_s: float,
    load: tuple[str, str],
) -> tuple[str, list[str]]:
    env = common.environment_line(["onnxcomp", "onnx", "onnxruntime", "numpy"])
    flag = " --quick" if args.quick else " --full" if args.full else ""
    para, losses = summary(benches, cal_rows)
    out = [
        "onnxcomp's `quantize` against `onnxruntime.quantization` (`quantize_static` in QDQ format, "
        "`quantize_dynamic`, `MatMulNBitsQuantizer`) with the same calibration samples in the same batches and "
        "matched settings: int8 weights symmetric per-channel, uint8 activations asymmetric per-tensor (onnxcomp's "
        "default; ORT's `QUInt8`), the ops Conv/ConvTranspose/Gemm/MatMul with a constant weight (ORT's activation "
        f"x activation MatMuls are excluded because onnxcomp keeps them float), percentile {PERCENTILE:g} for both. "
        "onnxcomp otherwise runs at its defaults: placement speed (thin depthwise and small 1x1 convs stay float "
        "where QLinearConv is slower on ORT CPU; ORT quantizes every conv), MatMul outputs left float (ORT puts a "
        "Q/DQ on them), `reports=False` (no SQNR / fused-kernel report; ORT makes none). The `static, defaults` "
        "row pairs each tool's default calibration (onnxcomp: histogram-error search; ORT: MinMax); dynamic is "
        "per-tensor uint8 on both sides.",
        "",
        "```sh",
        f".venv/bin/python bench/ptq.py{flag}",
        "```",
        "",
        f"{env} This run: `bench/ptq.py{flag}`, {runtime_s / 60:.1f} min.",
        "",
        "How it is measured:",
        "",
        f"- **quant time**: wall time inside a fresh subprocess around the quantization call only (not the "
        f"interpreter start, imports or data loading); {'median of ' + str(repeats) + ' runs' if repeats > 1 else '1 run (use --full for the median of 3)'}. "
        "onnxcomp's includes its fusions, opset upgrade, calibration, output validation after each pass and "
        "writing its record JSON (not the optional SQNR / kernel reports: `reports=False`); ORT's includes "
        "`onnx.version_converter` to opset 13 when the model is older (ppocr_det: ORT per-channel QDQ needs 13) and "
        "`quant_pre_process(skip_symbolic_shape=True)` for the static and dynamic flows (ORT's recommended step; "
        "it folds BatchNorm and drops Identity/Dropout like onnxcomp's fusions; symbolic shape inference fails "
        "on both real models).",
        "- **peak RSS**: `VmHWM` of that subprocess (read by it from `/proc/self/status` when the job is done), "
        "nothing subtracted. (`ru_maxrss` from `wait4`/`RUSAGE_CHILDREN` is unusable here: Linux carries the "
        "pre-`exec` high-water mark, i.e. the parent's RSS at spawn, into it.) *above baseline* subtracts "
        "the peak of a subprocess of the same tool that only imports the same modules and loads the model and the "
        "calibration data.",
        f"- **latency**: onnxruntime CPU, ORT_ENABLE_ALL, intra-op threads 1 and 2, median of {lat_runs} runs "
        f"after {LAT_WARMUP} warm-up runs, in the benchmark process, all models of a table timed round-robin "
        "(one run each per round) so that load from other processes hits them alike. The machine was shared: "
        f"1-minute load average {load[0]} at the start and {load[1]} at the end of the run, so compare "
        "latencies within a table, not across runs.",
        "- **size**: the output `.onnx` file.",
        "- Rows marked `*` are extra onnxcomp options with no ORT counterpart; they are not counted as matched pairs.",
        "- What ORT's calibration methods compute: `Percentile` takes the percentile of |x| (its default "
        "`symmetric=True` for that method) on a 2048-bin histogram, rounds up to a bin edge and clips [-t, t] to "
        "[min, max]; `Entropy` through `quantize_static` always uses 128 histogram bins and 128 quantized bins "
        "(`quantize_static` cannot change them), which leaves one candidate threshold, so it returns the min/max "
        "range. onnxcomp's `percentile` and `entropy` observers (`onnxcomp/quant/observers.py`) are run at the same "
        "percentile value and with their own defaults otherwise.",
        f"- ORT's `MatMulNBitsQuantizer` imports `onnx_ir`, which needs `sympy`; onnxruntime does not declare them. "
        f"When the venv lacks them the script pip-installs {', '.join(f'`{p}`' for p in PEER_PINS)} (`--no-deps`) "
        "into a folder of the user's cache (`$ONNXCOMP_BENCH_PEERS` overrides it) and puts that folder on the ORT "
        "children's `PYTHONPATH` only; the project venv is not changed.",
        "",
    ]
    for b in benches:
        base = ", ".join(
            f"{'onnxcomp' if k == 'onnxcomp' else 'ORT' if k == 'ort' else 'ORT + onnx_ir'} {v:.0f} MB"
            for k, v in sorted(b.baselines.items())
        )
        out += [
            f"### {b.title}",
            "",
            f"Calibration: {b.calib_text}. Metric: {b.eval_text}. Latency input: {b.latency_text}. "
            f"Baseline process peak RSS: {base}.",
            "",
            model_table(b),
            "",
        ]
        notes = [f"- {r.setting} / {r.tool}: {r.note}" for r in b.rows if r.note]
        if notes:
            out += notes + [""]
    if cal_rows:
        out += [
            "### Calibration alone: percentile and entropy, onnxcomp vs ORT",
            "",
            "onnxcomp: `onnx.load` + `Calibrator(model, {tensor: observer}).run(batches)` + `compute_range` per "
            "tensor (streaming histograms, one onnxruntime session with 1 intra-op thread). ORT: "
            "`create_calibrator(path, ops)` + `collect_data(reader)` + `compute_data()` (keeps every batch's "
            "intermediate outputs until the end; its session uses ORT's default thread count). Same tensors "
            "(the ones ORT selects for Conv/ConvTranspose/Gemm/MatMul), same batches, each in a fresh "
            f"subprocess. Percentile: {PERCENTILE:g}, 2048 bins for both. Entropy: ORT's defaults (128 bins, "
            "128 quantized bins: with so few bins its search has a single candidate, the full range) and "
            "onnxcomp's defaults (2048 bins, 128 quantized bins).",
            "",
        ]
        out += [f"- {k}: {v}" for k, v in cal_texts.items()] + [""]
        headers = [
            "model",
            "policy",
            "samples",
            "tensors",
            "onnxcomp s",
            "ORT s",
            "time ratio oc/ORT",
            "onnxcomp peak MB",
            "ORT peak MB",
            "RSS ratio oc/ORT",
            "baseline MB oc / ORT",
        ]
        rows = []
        for r in cal_rows:
            if r.error:
                rows.append([r.model, r.policy, r.samples, r.tensors, f"failed: {r.error}"] + ["-"] * 6)
                continue
            rows.append(
                [
                    r.model,
                    r.policy,
                    r.samples,
                    r.tensors,
                    common.fmt(r.oc_time),
                    common.fmt(r.ort_time),
                    common.fmt(r.oc_time / r.ort_time),
                    common.fmt(r.oc_peak, 0),
                    common.fmt(r.ort_peak, 0),
                    common.fmt(r.oc_peak / r.ort_peak),
                    f"{r.oc_base:.0f} / {r.ort_base:.0f}",
                ]
            )
        out += [common.markdown_table(headers, rows, "llrrrrrrrrr"), ""]
    out += [
        "### Quantize time and peak RSS, onnxcomp vs ORT",
        "",
        "Over the matched pairs of the tables above (onnxcomp row vs the `onnxruntime` row of the same setting): "
        "medians of each tool's quantize wall time and peak RSS, and the median (min-max) of the per-pair ratios "
        "onnxcomp / ORT (< 1: onnxcomp faster or smaller). *above baseline* = peak minus the peak of a process "
        "that only imports the tool and loads the model and data.",
        "",
        cost_table(benches),
        "",
        "### Where onnxcomp is better or worse",
        "",
        para,
        "",
    ]
    return "\n".join(out), losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: fewer samples, smaller inputs, no percentile rows on the real models, no extra rows, calibration-only on minilm_l3 only",
    )
    parser.add_argument("--full", action="store_true", help="quantization time = median of 3 runs")
    parser.add_argument(
        "--only",
        choices=["digits_cnn", "ppocr_det", "minilm_l3"],
        action="append",
        help="only these models (repeatable); the README is not written",
    )
    parser.add_argument("--no-calibration", action="store_true", help="skip the calibration-only comparison")
    parser.add_argument(
        "--cost-only",
        type=int,
        metavar="ROUNDS",
        help="only the quantize time / peak RSS table of the matched pairs, medians of ROUNDS interleaved "
        "rounds (no metrics, latency or calibration-only part; the README is not written)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        help="--cost-only: only the jobs whose setting contains this text (repeatable), e.g. 'int4'",
    )
    parser.add_argument("--no-readme", action="store_true", help="print only; leave bench/README.md alone")
    parser.add_argument(
        "--observer-cost",
        choices=sorted(OBSERVER_DATA),
        action="append",
        help="only the calibration time of every observer on this model (repeatable), interleaved rounds, printed",
    )
    parser.add_argument(
        "--observer-rounds", type=int, default=2, metavar="N", help="--observer-cost: interleaved rounds (default 2)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    load_start = common.load_average()
    repeats = 3 if args.full else 1
    lat_runs = 50 if args.full else 20

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    if args.observer_cost:
        print(f"{common.environment_line(['onnx', 'onnxruntime', 'numpy'])}")
        load_before = common.load_average()
        tables = [observer_costs(key, args.observer_rounds, log) for key in args.observer_cost]
        print(f"1-minute load average {load_before} at the start, {common.load_average()} at the end\n")
        print("\n\n".join(tables))
        return 0
    peer_env = _peer_env()
    have_nbits = bool(peer_env) or bool(importlib.util.find_spec("onnx_ir"))
    work = Path(tempfile.mkdtemp(prefix="onnxcomp-bench-ptq-"))
    if args.cost_only:
        try:
            benches = [b for b in build_models(work, args.quick) if not args.only or b.key in args.only]
            for b in benches:
                log(f"{b.key}")
                plan_jobs(b, work, have_nbits, args.quick)
                run_costs(b, args.cost_only, peer_env, log, args.setting)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        load = (load_start, common.load_average())
        print(f"{common.environment_line(['onnx', 'onnxruntime', 'numpy'])}")
        print(
            f"{args.cost_only} interleaved rounds; 1-minute load average {load[0]} at the start, {load[1]} at the end"
        )
        print(cost_table(benches))
        print()
        print(cost_jobs_table(benches))
        log(f"done in {time.perf_counter() - start:.0f} s")
        return 0
    try:
        benches = [b for b in build_models(work, args.quick) if not args.only or b.key in args.only]
        for b in benches:
            log(f"{b.key}")
            plan_jobs(b, work, have_nbits, args.quick)
            run_bench(b, repeats, lat_runs, peer_env, log)
        cal_rows, cal_texts = (
            ([], {}) if args.no_calibration or args.only else run_calibration_only(work, args.quick, log)
        )
        runtime = time.perf_counter() - start
        body, losses = render(
            benches, cal_rows, cal_texts, args, repeats, lat_runs, runtime, (load_start, common.load_average())
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{SECTION}\n\n{body}")
    if losses:
        print("onnxcomp metric below onnxruntime at matched settings:", file=sys.stderr)
        for item in losses:
            print(f"  - {item}", file=sys.stderr)
    if not args.no_readme and not args.only:
        common.write_readme_section(README, SECTION, body)
        log(f"wrote the '{SECTION}' section of {README.relative_to(REPO)}")
    log(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        common.child_main(HANDLERS)
    else:
        raise SystemExit(main())
