"""Low-bit formats on real models: accuracy, size, storage and ORT CPU speed of every format.

Run from the repo root: ``.venv/bin/python bench/lowbit.py`` (about 10 min on 2 cores) or
``--quick`` (a subset of rows, smaller inputs, under 2 min; prints only). The full run replaces
the "## Low-bit formats" section of bench/README.md (``--no-readme`` to only print).

For each model (``minilm_l3`` transformer, ``ppocr_det`` CNN, the ``digits_cnn`` demo) and each
row (format x granularity, weight-only or weights + activations) it runs
``onnxcomp.api.quantize`` on the fp32 model and measures:

* agreement with fp32 on held-out inputs (a seed other than the calibration seed): cosine of the
  primary output (flattened over all samples), plus the task metric (minilm: paraphrase
  retrieval, i.e. share of the 64 corpus sentences whose nearest neighbour by embedding is their
  paraphrase; digits: held-out top-1 accuracy);
* the serialized model size and its ratio to the fp32 file;
* stored bits per quantized weight (``onnxcomp.summary.weight_storage``: codes + scales + zero
  points + tables over every Conv/Gemm/MatMul weight) and, for the transformer, the size of the
  MatMul weights alone against their fp32 size (the issue asks MXFP4 and FP4_E1M2 < 0.3x);
* median ORT CPU latency (1 thread, ORT_ENABLE_ALL) and its ratio to the fp32 model timed in the
  same rounds (and to the fp32 model with its denormal weights set to 0, when it has any: they
  slow ORT's CPU kernels several-fold), the kernels ORT turns the quantized ops into (from the
  optimized graph), the max |ALL - DISABLE_ALL| difference of the outputs and the cosine at
  DISABLE_ALL;
* quantization wall time (fusions + calibration + quantize pass + its SQNR report).

A row that ``quantize`` rejects is kept as an ERROR row; MX activations, which need a static last
dimension, are retried on a copy of the CNN with fixed H and W (marked with a dagger).

It also measures the weight-level SQNR of FP4_E1M2 vs FP4_E2M1 (group:32) on each model's own
weights and on synthetic uniform / Gaussian / Laplace data, to test the guidance "E1M2 for uniform
data, E2M1 for Gaussian data". Helpers shared with the other benchmarks come from bench/_common.py.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from _common import environment_line, load_average, write_readme_section  # noqa: E402  (bench/_common.py)

from models.fetch import MODELS, fetch, make_inputs  # noqa: E402
from onnxcomp.analysis.inspect import weight_storage  # noqa: E402
from onnxcomp.analysis.metrics import cosine  # noqa: E402
from onnxcomp.api import quantize  # noqa: E402
from onnxcomp.runtime import ort_session  # noqa: E402

README = REPO / "bench" / "README.md"
SECTION = "## Low-bit formats"


# --------------------------------------------------------------------------------------------
# The rows: (label, quantize() keywords, needs calibration)
# --------------------------------------------------------------------------------------------

MIXED = {"weights": "int8", "activations": "hif8", "op_types": {"MatMul": {"weights": "mxfp4"}}}


@dataclass(frozen=True)
class Row:
    label: str
    kwargs: dict[str, Any]
    static: bool = False  # static activations: needs calibration data
    group: str = "weight-only"
    quick: bool = False


def _w(label: str, quick: bool = False, **kw: Any) -> Row:
    return Row(label, {"activations": "none", **kw}, False, "weight-only", quick)


def _wa(label: str, static: bool, quick: bool = False, **kw: Any) -> Row:
    return Row(label, kw, static, "W+A", quick)


ROWS: list[Row] = [
    _w("int8 channel", True, weights="int8", granularity="channel"),
    _w("int4 group:32", weights="int4", granularity="group:32"),
    _w("int4 group:128", weights="int4", granularity="group:128"),
    _w("fp8_e4m3 channel", weights="fp8_e4m3", granularity="channel"),
    _w("hif8 channel", weights="hif8", granularity="channel"),
    _w("mxfp8", weights="mxfp8"),
    _w("mxfp4", True, weights="mxfp4"),
    _w("mxfp4 (fp4_storage=uint4_lut)", weights="mxfp4", fp4_storage="uint4_lut"),
    _w("fp4_e2m1 group:32", True, weights="fp4_e2m1", granularity="group:32"),
    _w("fp4_e2m1 group:128", weights="fp4_e2m1", granularity="group:128"),
    _w("fp4_e1m2 group:32", True, weights="fp4_e1m2", granularity="group:32"),
    _w("fp4_e1m2 group:128", weights="fp4_e1m2", granularity="group:128"),
    _wa("int8 / int8 static", True, True, weights="int8", granularity="channel", activations="int8"),
    _wa("fp8_e4m3 / fp8_e4m3 static", True, weights="fp8_e4m3", granularity="channel", activations="fp8_e4m3"),
    _wa("hif8 / hif8 static", True, weights="hif8", granularity="channel", activations="hif8"),
    _wa(
        "hif8 / hif8 dynamic per-token",
        False,
        True,
        weights="hif8",
        granularity="channel",
        activations="hif8",
        dynamic=True,
    ),
    _wa("mxfp8 / mxfp8 (dynamic blocks)", False, weights="mxfp8", activations="mxfp8"),
    _wa("mxfp4 / mxfp8 (dynamic blocks)", False, weights="mxfp4", activations="mxfp8"),
    _wa(
        "fp4_e2m1 group:32 / fp8_e4m3 static", True, weights="fp4_e2m1", granularity="group:32", activations="fp8_e4m3"
    ),
    _wa("mixed: MatMul mxfp4, Conv/Gemm int8, hif8 static act.", True, True, config=MIXED),
]


# --------------------------------------------------------------------------------------------
# Models: fp32 model, evaluation / calibration / latency inputs, task metric
# --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    name: str
    title: str
    model: onnx.ModelProto
    file_bytes: int
    output: str  # primary output compared with fp32
    eval_feeds: dict[str, np.ndarray]
    calib: list[dict[str, np.ndarray]]
    lat_feeds: dict[str, np.ndarray]
    lat_runs: int
    metric_name: str | None = None
    metric: Callable[[np.ndarray], float] | None = None
    eval_batch: int = 256
    notes: list[str] = field(default_factory=list)
    transformer: bool = False
    base_ops: Counter = field(default_factory=Counter)
    lat_budget: float = 10.0  # seconds of latency timing per row at most (after 5 rounds)
    static_model: onnx.ModelProto | None = None  # same model with static spatial dims (MX activations)
    static_desc: str = ""
    static_failures: list[str] = field(default_factory=list)  # [first error, row labels...]

    @property
    def param_count(self) -> int:
        return sum(int(np.prod(t.dims)) for t in self.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def _split(feeds: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(feeds.values())))
    return [{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, n, size)]


def _paraphrase_retrieval(texts: list[str]) -> Callable[[np.ndarray], float] | None:
    """Share (%) of sentences whose nearest neighbour (cosine) is their paraphrase (pairs 2k, 2k+1)."""
    import models.fetch as mf

    corpus = getattr(mf, "_SENTENCES", None)
    if corpus is None:
        return None
    index = {s: i for i, s in enumerate(corpus)}
    if any(t not in index for t in texts):
        return None
    pos = {index[t]: j for j, t in enumerate(texts)}
    partner = np.array([pos.get(index[t] ^ 1, -1) for t in texts])
    if (partner < 0).any():
        return None

    def metric(emb: np.ndarray) -> float:
        e = emb.astype(np.float64)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return float((sim.argmax(axis=1) == partner).mean() * 100.0)

    return metric


def bench_minilm(quick: bool) -> Bench:
    path = fetch("minilm_l3")
    n_eval = 64  # the whole built-in corpus: 32 paraphrase pairs
    eval_feeds, meta = make_inputs("minilm_l3", n_eval, seed=0, return_meta=True)
    # Calibration: seed 1, the samples past the 64-sentence corpus (random two-sentence joins),
    # so no calibration sequence is an evaluation sequence.
    cal = make_inputs("minilm_l3", 64 + (16 if quick else 64), seed=1)
    cal = {k: v[64:] for k, v in cal.items()}
    lat = {k: v[:16] for k, v in eval_feeds.items()}  # 16 sentences x 18 tokens
    return Bench(
        "minilm_l3",
        "transformer `minilm_l3` (paraphrase-MiniLM-L3-v2)",
        onnx.load(path),
        path.stat().st_size,
        MODELS["minilm_l3"]["primary_output"],
        eval_feeds,
        _split(cal, 16),
        lat,
        10 if quick else 20,
        "retrieval %",
        _paraphrase_retrieval(meta["sentences"]),
        transformer=True,
        notes=[
            f"eval: the 64 corpus sentences (seed 0, {eval_feeds['input_ids'].shape[1]} tokens padded); "
            f"calibration: {len(cal['input_ids'])} two-sentence joins (seed 1) in batches of 16; "
            "latency: 16 sentences x 18 tokens"
        ],
    )


def bench_ppocr(quick: bool) -> Bench:
    path = fetch("ppocr_det")
    h, w = (128, 160) if quick else (256, 352)
    n_eval = 2 if quick else 4
    eval_feeds = make_inputs("ppocr_det", n_eval, seed=1, height=h, width=w)
    cal = make_inputs("ppocr_det", 4, seed=0, height=h, width=w)
    lat = {k: v[:1] for k, v in eval_feeds.items()}
    model = onnx.load(path)
    return Bench(
        "ppocr_det",
        f"CNN `ppocr_det` (PP-OCRv6 small detector) at {h}x{w}",
        model,
        path.stat().st_size,
        MODELS["ppocr_det"]["primary_output"],
        eval_feeds,
        _split(cal, 2),
        lat,
        5 if quick else 12,
        eval_batch=2,
        notes=[
            f"eval: {n_eval} synthetic pages (seed 1) at {h}x{w}; calibration: 4 pages (seed 0) in batches of 2; "
            f"latency: 1 page"
        ],
        lat_budget=4.0 if quick else 8.0,
        static_model=fix_spatial(model, h, w),
        static_desc=f"N x 3 x {h} x {w}",
    )


def fix_spatial(model: onnx.ModelProto, h: int, w: int) -> onnx.ModelProto:
    """A copy of an NCHW model whose inputs have static H and W (N stays dynamic)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for inp in out.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 4:
            for d, v in ((dims[2], h), (dims[3], w)):
                d.Clear()
                d.dim_value = v
    return out


def bench_digits(quick: bool) -> Bench:
    path = REPO / "models" / "digits_cnn.onnx"
    held = np.load(REPO / "models" / "digits_heldout.npz")
    calib = np.load(REPO / "models" / "digits_calib.npz")
    labels = held["label"]
    return Bench(
        "digits_cnn",
        "demo CNN `models/digits_cnn.onnx`",
        onnx.load(path),
        path.stat().st_size,
        "logits",
        {"input": held["input"]},
        _split({"input": calib["input"]}, 64),
        {"input": held["input"][:1]},
        20 if quick else 100,
        "accuracy %",
        lambda logits: float((logits.argmax(1) == labels).mean() * 100),
        notes=[
            "eval: 540 held-out digits (`digits_heldout.npz`); calibration: `digits_calib.npz` (128 training "
            "samples); latency: 1 image. Its Gemm layers are not MatMul, so the mixed config is int8 everywhere"
        ],
    )


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def run_output(model: onnx.ModelProto, feeds: dict[str, np.ndarray], output: str, level: str, batch: int) -> np.ndarray:
    session = ort_session(model, level=level, threads=1)
    outs = [session.run([output], part)[0] for part in _split(feeds, batch)]
    return np.concatenate(outs)


#: ops of ORT's optimized graph worth reporting (fused quantized kernels and what stays unfused)
KERNELS = {
    "MatMulNBits": "MatMulNBits",
    "QLinearConv": "QLinearConv",
    "QLinearMatMul": "QLinearMatMul",
    "MatMulIntegerToFloat": "MatMulIntegerToFloat",
    "QGemm": "QGemm",
    "DynamicQuantizeMatMul": "DynQMatMul",
    "DequantizeLinear": "DQ",
    "QuantizeLinear": "Q",
    "Cast": "Cast",
    "Floor": "Floor",
}


def ort_kernels(model: onnx.ModelProto) -> Counter:
    """Op counts of ORT's ORT_ENABLE_ALL graph (what actually runs); ``LUT Gather`` = table lookups left."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="lowbit-") as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        opt = onnx.load(opts.optimized_model_filepath)
    ops = Counter(n.op_type for n in opt.graph.node)
    ops["LUT Gather"] = sum(
        1 for n in opt.graph.node if n.op_type == "Gather" and re.search(r"(decode|int)_table", n.input[0])
    )
    return ops


def kernels_text(ops: Counter, base: Counter) -> str:
    """Quantization-related ops beyond those of the fp32 model's optimized graph."""
    parts = []
    for op, short in (*KERNELS.items(), ("LUT Gather", "LUT Gather")):
        n = ops.get(op, 0) - base.get(op, 0)
        if n:
            parts.append(f"{short} {n:+d}" if op == "Cast" else f"{short} {n}")
    return ", ".join(parts) or "-"


def storage_summary(model: onnx.ModelProto) -> tuple[float, float, str]:
    """(bits per weight over all Conv/Gemm/MatMul weights, ratio to fp32, storage labels)."""
    st = weight_storage(model)
    weights = sum(v["weights"] for v in st.values())
    bits = sum(v["bits"] for v in st.values())
    labels = "; ".join(sorted(st)) if st else "-"
    return (bits / weights if weights else float("nan")), (bits / (32.0 * weights) if weights else float("nan")), labels


@dataclass
class Result:
    row: str
    group: str
    cos: float = float("nan")
    metric: float | None = None
    mb: float = float("nan")
    size_ratio: float = float("nan")
    bits: float = float("nan")
    w_ratio: float = float("nan")
    storage: str = ""
    lat: float = float("nan")
    lat_ratio: float = float("nan")
    lat_ratio_flushed: float = float("nan")
    cos_dis: float = float("nan")
    kernels: str = ""
    diff: float = float("nan")
    qtime: float = float("nan")
    error: str | None = None


def timed_rounds(
    sessions: list[Any], feeds: dict[str, np.ndarray], runs: int, budget_s: float, warmup: int = 2
) -> list[float]:
    """Median ms of ``run`` for each session, timed in rotating order (round i starts at session i mod n).

    Interleaving keeps the ratios meaningful on a machine shared with other jobs. ``runs`` rounds, or fewer
    (at least 5) when one round takes longer than ``budget_s / runs``.
    """
    for _ in range(warmup):
        for s in sessions:
            s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    t_start = time.perf_counter()
    for i in range(runs):
        order = list(range(len(sessions)))
        order = order[i % len(order) :] + order[: i % len(order)]
        for j in order:
            t0 = time.perf_counter()
            sessions[j].run(None, feeds)
            times[j].append((time.perf_counter() - t0) * 1e3)
        if i >= 4 and time.perf_counter() - t_start > budget_s:
            break
    return [statistics.median(t) for t in times]


def flush_denormals(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy with float32 initializers' denormal values set to 0 (and how many there were)."""
    tiny = np.finfo(np.float32).tiny
    out = onnx.ModelProto()
    out.CopyFrom(model)
    count = 0
    for init in out.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        w = onnx.numpy_helper.to_array(init)
        bad = (w != 0) & (np.abs(w) < tiny)
        if bad.any():
            count += int(bad.sum())
            init.CopyFrom(onnx.numpy_helper.from_array(np.where(bad, np.float32(0), w).astype(np.float32), init.name))
    return out, count


def measure(
    b: Bench, model: onnx.ModelProto, ref: np.ndarray, label: str, group: str, qtime: float, ref_sessions: list[Any]
) -> Result:
    r = Result(label, group, qtime=qtime)
    all_session = ort_session(model, level="all", threads=1)  # as onnxcomp.evaluate.latency_ms builds it
    out_all = np.concatenate([all_session.run([b.output], part)[0] for part in _split(b.eval_feeds, b.eval_batch)])
    out_dis = run_output(model, b.eval_feeds, b.output, "disable", b.eval_batch)
    r.diff = float(np.max(np.abs(out_all.astype(np.float64) - out_dis.astype(np.float64))))
    r.cos = cosine(ref, out_all)
    r.cos_dis = cosine(ref, out_dis)
    if b.metric is not None:
        r.metric = b.metric(out_all)
    size = model.ByteSize()
    r.mb, r.size_ratio = size / 1e6, size / b.file_bytes
    r.bits, r.w_ratio, r.storage = storage_summary(model)
    r.kernels = kernels_text(ort_kernels(model), b.base_ops)
    medians = timed_rounds([all_session, *ref_sessions], b.lat_feeds, b.lat_runs, b.lat_budget)
    r.lat = medians[0]
    r.lat_ratio = medians[0] / medians[1]
    r.lat_ratio_flushed = medians[0] / medians[2] if len(medians) > 2 else r.lat_ratio
    return r


def bench_model(b: Bench, rows: list[Row], log: Callable[[str], None]) -> list[Result]:
    if b.transformer:
        other = [n.op_type for n in b.model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")]
        assert not other, "the MatMul-only size column assumes the transformer has no Conv/Gemm"
    ref = run_output(b.model, b.eval_feeds, b.output, "all", b.eval_batch)
    ref_sessions = [ort_session(b.model, level="all", threads=1)]
    flushed, n_denormal = flush_denormals(b.model)
    if n_denormal:
        ref_sessions.append(ort_session(flushed, level="all", threads=1))
        b.notes.append(
            f"the fp32 model holds {n_denormal:,} denormal weights ({n_denormal / b.param_count:.1%} of its float "
            "parameters), which make ORT's CPU kernels slow; **vs flushed** compares with the fp32 model whose "
            "denormal weights are set to 0 (row 2), the fair baseline for speed"
        )
    b.base_ops = ort_kernels(b.model)
    results = [measure(b, b.model, ref, "fp32 (reference)", "-", 0.0, ref_sessions)]
    if n_denormal:
        results.append(measure(b, flushed, ref, "fp32, denormal weights set to 0", "-", 0.0, ref_sessions))
    log(f"  {b.name}: fp32 done ({results[0].lat:.1f} ms; {n_denormal} denormal weights)")
    for row in rows:
        t0 = time.perf_counter()
        label, model = row.label, b.model
        try:
            try:
                rep = quantize(model, calibration=b.calib if row.static else None, **row.kwargs)
            except Exception as exc:  # noqa: BLE001
                if b.static_model is None or "static last dimension" not in str(exc):
                    raise
                if not b.static_failures:
                    b.static_failures.append(str(exc).splitlines()[0])
                b.static_failures.append(row.label)
                label, model = f"{row.label} †", b.static_model
                t0 = time.perf_counter()
                rep = quantize(model, calibration=b.calib if row.static else None, **row.kwargs)
            qtime = time.perf_counter() - t0
            res = measure(b, rep.model, ref, label, row.group, qtime, ref_sessions)
        except Exception as exc:  # noqa: BLE001 - a failing row is a finding, not a crash
            res = Result(label, row.group, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            log(traceback.format_exc(limit=3))
        results.append(res)
        log(
            f"  {b.name}: {label}: "
            + (res.error or f"cos {res.cos:.5f} lat {res.lat:.1f} ms (x{res.lat_ratio:.2f}) q {res.qtime:.1f}s")
        )
    return results


# --------------------------------------------------------------------------------------------
# E1M2 vs E2M1 on weights
# --------------------------------------------------------------------------------------------


def _sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    return 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise) if noise else float("inf")


def fp4_weight_sqnr(benches: list[Bench]) -> list[tuple[str, str, float, float, float]]:
    """(data, excess kurtosis, SQNR E1M2, SQNR E2M1, SQNR INT4) with group:32 scaling, minmax.

    Model rows pool the error over every quantizable weight and give the median per-tensor kurtosis.
    """
    from onnxcomp.ir import weight_layout
    from onnxcomp.quant.spec import Granularity, TensorSpec
    from onnxcomp.quant.weights import quantize_weight

    def sqnrs(pairs: list[tuple[np.ndarray, Any]]) -> list[float]:
        out = []
        for fmt in ("fp4_e1m2", "fp4_e2m1", "int4"):
            spec = TensorSpec(fmt, Granularity("group", 32), True, "minmax")
            refs, deqs = [], []
            for w, layout in pairs:
                refs.append(w.ravel())
                deqs.append(quantize_weight(w, spec, layout, "w").dequantized.ravel())
            out.append(_sqnr(np.concatenate(refs), np.concatenate(deqs)))
        return out

    def kurt(x: np.ndarray) -> float:
        x = x.astype(np.float64).ravel()
        x = x - x.mean()
        return float(np.mean(x**4) / np.mean(x**2) ** 2 - 3.0)

    rows = []
    rng = np.random.default_rng(0)
    mm = weight_layout("MatMul", 2)
    for name, data in (
        ("synthetic uniform U(-1,1) 1024x1024", rng.uniform(-1, 1, (1024, 1024))),
        ("synthetic Gaussian N(0,1) 1024x1024", rng.standard_normal((1024, 1024))),
        ("synthetic Laplace 1024x1024", rng.laplace(0, 1, (1024, 1024))),
    ):
        w = data.astype(np.float32)
        rows.append((name, f"{kurt(w):.2f}", *sqnrs([(w, mm)])))
    from onnxcomp.api import fuse

    for b in benches:
        model = fuse(b.model).model
        inits = {t.name: t for t in model.graph.initializer}
        pairs = []
        for n in model.graph.node:
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits:
                w = onnx.numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
                if w.ndim < 2:
                    continue
                trans = any(a.name == "transB" and a.i for a in n.attribute)
                layout = weight_layout(n.op_type, w.ndim, trans)
                if w.shape[layout.reduction_axis] >= 8:  # the quantize pass declines shorter ones
                    pairs.append((w, layout))
        size = sum(w.size for w, _ in pairs)
        k = float(np.median([kurt(w) for w, _ in pairs]))
        rows.append((f"{b.name} weights ({len(pairs)} tensors, {size:,} values)", f"{k:.2f}", *sqnrs(pairs)))
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def table(b: Bench, results: list[Result]) -> list[str]:
    metric = f" | {b.metric_name}" if b.metric_name else ""
    flushed = any("denormal" in r.row for r in results)
    wcol = "MatMul weights vs fp32" if b.transformer else "weights vs fp32"
    lines = [
        f"| config (weights / activations) | cosine{metric} | file MB | file vs fp32 | bits/weight | {wcol} "
        "| stored as | ORT ms | vs fp32 |"
        + (" vs flushed |" if flushed else "")
        + " ORT ALL graph | max abs ALL-DISABLE | cosine at DISABLE_ALL | quantize s |",
        "|---|---:"
        + ("|---:" if metric else "")
        + "|---:|---:|---:|---:|---|---:|---:"
        + ("|---:" if flushed else "")
        + "|---|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.row} | ERROR: {r.error} |" + " |" * (11 + bool(metric) + flushed))
            continue
        m = f" | {_f(r.metric, '.1f')}" if metric else ""
        lines.append(
            f"| {r.row} | {r.cos:.5f}{m} | {r.mb:.2f} | {r.size_ratio:.3f} | {_f(r.bits, '.2f')} | {_f(r.w_ratio, '.3f')} "
            f"| {r.storage} | {r.lat:.1f} | {r.lat_ratio:.2f} |"
            + (f" {r.lat_ratio_flushed:.2f} |" if flushed else "")
            + f" {r.kernels} | {r.diff:.2g} | {r.cos_dis:.5f} | {r.qtime:.1f} |"
        )
    return lines


def fp4_table(rows: list[tuple[str, str, float, float, float]]) -> list[str]:
    lines = [
        "| data | excess kurtosis (median per tensor) | SQNR fp4_e1m2 dB | SQNR fp4_e2m1 dB | SQNR int4 dB |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {d} | {k} | {a:.2f} | {b:.2f} | {c:.2f} |" for d, k, a, b, c in rows]
    return lines


def footer(total: float, load0: str, quick: bool) -> str:
    return (
        environment_line(("onnxcomp", "onnx", "onnxruntime", "numpy"))
        + f" Whole run {total:.0f} s"
        + (" (--quick)" if quick else "")
        + f"; 1-minute load average {load0} at the start and {load_average()} "
        "at the end (a shared machine: read the latency ratios, not the absolute ms, and treat ratios within "
        "about 25% of 1 as noise; the fp32 row, timed against itself, shows the run's noise)."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="subset of rows, smaller inputs (< 2 min); prints only")
    ap.add_argument("--models", default="minilm_l3,ppocr_det,digits_cnn", help="comma-separated subset")
    ap.add_argument("--rows", default="", help="only the rows whose label matches this regex (implies --no-readme)")
    ap.add_argument("--no-readme", action="store_true", help="print the section without writing bench/README.md")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    load0 = load_average()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    builders = {"minilm_l3": bench_minilm, "ppocr_det": bench_ppocr, "digits_cnn": bench_digits}
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    rows = [r for r in ROWS if r.quick] if args.quick else ROWS
    if args.rows:
        rows = [r for r in rows if re.search(args.rows, r.label)]
        args.no_readme = True
    benches, tables = [], []
    for name in names:
        b = builders[name](args.quick)
        log(f"{name}: {len(rows)} rows")
        tables.append((b, bench_model(b, rows, log)))
        benches.append(b)
    fp4 = fp4_weight_sqnr(benches)
    total = time.perf_counter() - start

    out = [
        "Every format on a transformer and a CNN through `onnxcomp.api.quantize` (fusions + quantize), run on "
        "stock onnxruntime's CPU provider. Regenerate with `.venv/bin/python bench/lowbit.py` "
        "(`--quick` for a smoke run that prints only).",
        "",
        "Columns: **cosine** of the primary output vs fp32 (flattened over the evaluation set); **file** = "
        "serialized model; **bits/weight** = stored bits (codes + scales + zero points + tables) per "
        "Conv/Gemm/MatMul weight, from `onnxcomp.summary.weight_storage`; **weights vs fp32** = those bits over "
        "32 bits per weight; **ORT ms** = median `session.run`, 1 thread, ORT_ENABLE_ALL; **vs fp32** = that "
        "median over the fp32 model's, the two timed alternately (ABBA) so that load from other jobs cancels; "
        "**ORT ALL graph** = ops in ORT's optimized graph beyond the fp32 model's (fused quantized kernels; DQ = "
        "DequantizeLinear still executed every run; Cast/Floor = FP8 casts and HiF8/MX rounding emulated in "
        "float ops; LUT Gather = table lookups not folded); **max abs ALL-DISABLE** = largest difference of the "
        "primary output between ORT_ENABLE_ALL and ORT_DISABLE_ALL, and **cosine at DISABLE_ALL** the cosine "
        "vs fp32 with no graph optimization; **quantize s** = wall time of `quantize()` (fusions, calibration, "
        "pass, its SQNR report). Weight granularity: int/fp8/hif8 per channel unless stated; mx* always 32-blocks "
        "along the "
        "reduction axis; fp4_* default storage `int8` (codes x2) except E1M2 (int4).",
        "",
    ]
    for b, results in tables:
        notes = list(b.notes)
        if b.static_failures:
            err, *labels = b.static_failures
            notes.append(
                f"† {', '.join(f'`{x}`' for x in labels)}: on the dynamic-shape model `quantize` fails with "
                f'"{err}"; these rows quantize a copy whose input shape is fixed to {b.static_desc}'
            )
        out += [f"### {b.title}", "", *(f"{n}." for n in notes), ""]
        out += table(b, results)
        out.append("")
    out += ["### FP4_E1M2 vs FP4_E2M1 on weights (group:32, minmax scale, weight-level SQNR; higher is better)", ""]
    out += fp4_table(fp4)
    out += [
        "",
        footer(total, load0, args.quick),
    ]
    body = "\n".join(out)
    print(body)
    if not args.quick and not args.no_readme:
        text = README.read_text(encoding="utf-8") if README.exists() else ""
        analysis = _existing_analysis(text)
        write_readme_section(README, SECTION, body + ("\n\n" + analysis if analysis else ""))
        log(f"wrote {README.relative_to(REPO)} ({SECTION})")
    log(f"total {total:.0f} s")
    return 0


ANALYSIS_MARK = "**Reading the tables.**"


def _existing_analysis(text: str) -> str:
    """Keep the hand-written reading paragraph of the section across regenerations."""
    m = re.search(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", text, re.S | re.M)
    if not m:
        return ""
    section = m.group(0)
    i = section.find(ANALYSIS_MARK)
    return section[i:].strip() if i >= 0 else ""


if __name__ == "__main__":
    raise SystemExit(main())
