"""ORT CPU latency of quantized models, and which quantized nodes ORT actually runs as integer kernels.

Issue 11: INT8 models written by ``onnxcomp quantize`` often run slower than fp32 on onnxruntime's
CPU provider while ``onnxruntime.quantization.quantize_static`` (QDQ) output runs faster. This bench
puts the variants side by side, per model, in ONE interleaved timing loop::

    .venv/bin/python bench/latency.py                      # all models (~5 min on 2 cores)
    .venv/bin/python bench/latency.py --quick              # smaller inputs, shorter budget (~2 min)
    .venv/bin/python bench/latency.py --models ppocr_cls,minilm_l3 --json out/latency.json
    .venv/bin/python bench/latency.py --variants "fp32,onnxcomp W8A8,onnxcomp W8A8 int8-act"

Variants (``VARIANTS`` below; one line each):

* ``fp32``: the model as shipped; ``fp32 fused``: after ``onnxcomp.fuse``;
* ``ORT QDQ``: ``quantize_static`` (QDQ format, per_channel=True, op_types_to_quantize
  Conv/MatMul/Gemm, ORT's defaults otherwise: QInt8 activations and weights, MinMax), after ORT's
  own preparation (opset >= 13 for per-channel QDQ, ``quant_pre_process`` without symbolic shape
  inference, as in bench/ptq.py); same calibration samples as onnxcomp;
* ``onnxcomp W8A8``: ``onnxcomp.quantize(calibration=...)`` with the defaults (int8 per-channel
  weights, uint8 asymmetric activations; Conv/MatMul/Gemm, ConvTranspose left float; placement
  speed: thin depthwise and 1x1 convs left float);
* ``onnxcomp W8A8 all``: the same with ``placement="all"`` (every eligible Conv quantized);
* ``onnxcomp dynamic per-tensor``: ``dynamic=True, dynamic_granularity="tensor"`` (ORT's fused
  DynamicQuantizeMatMul / ConvInteger);
* extra: ``onnxcomp W8A8 int8-act`` (``activations="int8"``: on x86 an int8 Q/DQ read by several
  nodes stays int8 and its producer and readers run in float) and ``onnxcomp dynamic per-token``;
* ``onnxcomp W4``: ``onnxcomp.quantize(weights="int4", activations="none")`` (weight-only).

``--extra`` adds ``EXTRA_VARIANTS`` (int8 activations, dynamic per-token). A new
onnxcomp variant is one ``oc(label, **quantize_keywords)`` line; the keywords go to
``onnxcomp.quantize`` unchanged, so an option that does not exist fails that row (ERROR) instead
of being silently emulated.

For every variant it reports the median and 10th-percentile ``session.run`` time at 1 and 2
intra-op threads (all variants x thread counts of one model timed round-robin in the same rounds,
rotating the start), the ratio to fp32, the cosine of the primary output against fp32, and, from
ORT's optimized graph (ORT_ENABLE_ALL, saved with ``optimized_model_filepath``):

* the fused integer kernels: QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, ConvInteger,
  MatMulInteger, DynamicQuantizeMatMul, MatMulNBits (any domain);
* "float<-DQ": Conv/ConvTranspose/MatMul/Gemm/FusedConv/FusedGemm/FusedMatMul nodes still fed by a
  DequantizeLinear, i.e. quantized nodes ORT left in float (weights dequantized at every run);
* other QLinear* kernels (QLinearAdd, QLinearMul, ...) and the Q/DQ nodes left.

For each variant that leaves quantized nodes in float, a diagnosis lists why, read from the
variant's own graph (before ORT): no QuantizeLinear on the output (and what reads it), int8
Q/DQ pairs read by several nodes (ORT's x86 QDQS8ToU8Transformer converts an int8 Q->DQ pair to
uint8 only when the Q has a single consumer; int8 activations are not fused on x86 unless the
session sets ``session.qdqisint8allowed``), a Relu/Clip before the Q that the Q does not make
redundant, an int32 bias whose scale is not x_scale*w_scale, a float activation input (weight-only).

Inputs come from ``models/fetch.make_inputs`` (calibration seed 0, timing seed 1) and the demo's
npz files. Prints Markdown; ``--json PATH`` also writes every number and the per-node diagnosis.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

import _common as common  # noqa: E402 - bench/_common.py
import onnx  # noqa: E402

from models.fetch import MODELS, fetch, make_inputs  # noqa: E402
from onnxcomp.analysis.kernels import INTEGER_KERNELS  # noqa: E402

#: fused integer kernels of ORT's CPU provider (counted in any domain): the kernel report's list
INT_KERNELS = tuple(sorted(INTEGER_KERNELS))
SHORT = {
    "QLinearConv": "QLConv",
    "QLinearMatMul": "QLMatMul",
    "MatMulIntegerToFloat": "MMI2F",
    "QGemm": "QGemm",
    "ConvInteger": "ConvInt",
    "MatMulInteger": "MMInt",
    "DynamicQuantizeMatMul": "DynQMM",
    "MatMulNBits": "MatMulNBits",
}
#: float compute nodes that, fed by a DequantizeLinear, mean "quantized but run in float"
FLOAT_TARGETS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul")
QUANT_OPS = ["Conv", "MatMul", "Gemm"]
THREADS = (1, 2)


# ============================================================================================
# Models
# ============================================================================================


@dataclass
class ModelSpec:
    name: str
    path: Path
    primary_output: str
    calib: dict[str, np.ndarray]  # all calibration samples (first axis)
    calib_batch: int
    feeds: dict[str, np.ndarray]  # the latency input (one batch)
    desc: str


def load_spec(name: str, quick: bool) -> ModelSpec:
    if name == "digits":
        calib = dict(np.load(REPO / "models" / "digits_calib.npz"))
        held = dict(np.load(REPO / "models" / "digits_heldout.npz"))
        n = 32 if quick else 64
        return ModelSpec(
            name,
            REPO / "models" / "digits_cnn.onnx",
            "logits",
            {"input": calib["input"][:n]},
            32,
            {"input": held["input"][:16]},
            f"demo CNN; calib {n} samples; timed batch 16 held-out digits",
        )
    path = fetch(name)
    out = MODELS[name]["primary_output"]
    if name == "ppocr_det":
        h, w = (256, 320) if quick else (480, 640)
        nc = 2 if quick else 4
        return ModelSpec(
            name,
            path,
            out,
            make_inputs(name, nc, seed=0, height=h, width=w),
            2,
            make_inputs(name, 1, seed=1, height=h, width=w),
            f"detector; calib {nc} pages {h}x{w}; timed 1 page {h}x{w}",
        )
    if name == "ppocr_rec":
        nc = 8 if quick else 16
        return ModelSpec(
            name,
            path,
            out,
            make_inputs(name, nc, seed=0),
            8,
            make_inputs(name, 4, seed=1),
            f"recognizer; calib {nc} lines 48x320; timed batch 4 lines",
        )
    if name == "ppocr_cls":
        nc = 16 if quick else 32
        return ModelSpec(
            name,
            path,
            out,
            make_inputs(name, nc, seed=0),
            16,
            make_inputs(name, 8, seed=1),
            f"MobileNetV3 classifier; calib {nc} lines 48x192; timed batch 8",
        )
    if name == "minilm_l3":
        nc = 16 if quick else 32
        return ModelSpec(
            name,
            path,
            out,
            make_inputs(name, nc, seed=0),
            16,
            make_inputs(name, 8, seed=1),
            f"BERT encoder; calib {nc} sentences; timed batch 8 sentences",
        )
    if name in MODELS:  # other catalogue models: defaults
        return ModelSpec(
            name,
            path,
            out,
            make_inputs(name, 8, seed=0),
            8,
            make_inputs(name, 1, seed=1),
            f"{MODELS[name]['task']}; calib 8; timed 1",
        )
    raise SystemExit(f"unknown model {name!r}; known: digits, {', '.join(MODELS)}")


DEFAULT_MODELS = ["digits", "ppocr_cls", "ppocr_det", "ppocr_rec", "minilm_l3"]


# ============================================================================================
# Variants: one line each
# ============================================================================================


@dataclass(frozen=True)
class Variant:
    label: str
    build: Callable[[ModelSpec, Path], Path]  # (model, output path) -> path of the model to time
    note: str = ""


def _fp32(spec: ModelSpec, out: Path) -> Path:
    return spec.path


def _fused(spec: ModelSpec, out: Path) -> Path:
    import onnxcomp

    onnxcomp.fuse(str(spec.path), str(out), force=True)
    return out


def _ort_reader(data: dict[str, np.ndarray], bs: int):  # -> onnxruntime.quantization.CalibrationDataReader
    from onnxruntime.quantization import CalibrationDataReader

    n = len(next(iter(data.values())))
    batches = [{k: v[i : i + bs] for k, v in data.items()} for i in range(0, n, bs)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(batches)

    return Reader()


def _ort_static(spec: ModelSpec, out: Path) -> Path:
    """ORT quantize_static, QDQ, per-channel, Conv/MatMul/Gemm, ORT defaults otherwise."""
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(spec.path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    src = spec.path
    if opset < 13:  # per-channel DequantizeLinear (axis) needs opset 13
        src = out.with_name(out.stem + ".opset13.onnx")
        onnx.save(version_converter.convert_version(model, 13), src)
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out),
        _ort_reader(spec.calib, spec.calib_batch),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANT_OPS,
        per_channel=True,
    )
    return out


def oc(label: str, calibrate: bool = True, note: str = "", **quantize_kwargs: Any) -> Variant:
    """An onnxcomp.quantize variant; ``quantize_kwargs`` go to onnxcomp.quantize unchanged."""

    def build(spec: ModelSpec, out: Path) -> Path:
        import onnxcomp

        kwargs = dict(quantize_kwargs)
        if calibrate:
            kwargs.update(calibration=spec.calib, batch_size=spec.calib_batch)
        onnxcomp.quantize(str(spec.path), str(out), force=True, **kwargs)
        return out

    args = ", ".join(f"{k}={v!r}" for k, v in quantize_kwargs.items())
    return Variant(label, build, note or f"onnxcomp.quantize({args}{', calibration' if calibrate else ''})")


VARIANTS: list[Variant] = [
    Variant("fp32", _fp32, "model as shipped"),
    Variant("fp32 fused", _fused, "onnxcomp.fuse"),
    Variant("ORT QDQ", _ort_static, "quantize_static QDQ per-channel Conv/MatMul/Gemm (QInt8/QInt8, MinMax)"),
    oc(
        "onnxcomp W8A8",
        note="onnxcomp.quantize(calibration): the defaults (int8 weights, uint8 activations, placement speed)",
    ),
    oc("onnxcomp W8A8 all", placement="all"),
    oc("onnxcomp dynamic per-tensor", calibrate=False, dynamic=True, dynamic_granularity="tensor"),
    oc("onnxcomp W4", calibrate=False, weights="int4", activations="none"),
]


#: more onnxcomp options, for a diagnosis (``--extra``)
EXTRA_VARIANTS: list[Variant] = [
    oc("onnxcomp W8A8 int8-act", activations="int8"),
    oc("onnxcomp dynamic per-token", calibrate=False, dynamic=True),
]


# ============================================================================================
# ORT's optimized graph: kernel counts and the diagnosis of nodes left in float
# ============================================================================================


def _producers(g: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in g.node for o in n.output if o}


def _consumers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def kernel_counts(opt: onnx.ModelProto) -> dict[str, Any]:
    ops = Counter(n.op_type for n in opt.graph.node)
    prod = _producers(opt.graph)
    float_fed = [
        n
        for n in opt.graph.node
        if n.op_type in FLOAT_TARGETS and any(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input)
    ]
    return {
        "int_kernels": {k: ops[k] for k in INT_KERNELS if ops[k]},
        "float_fed_by_dq": len(float_fed),
        "float_fed_nodes": [(n.name, n.op_type, list(n.input)) for n in float_fed],
        "other_qlinear": {k: v for k, v in sorted(ops.items()) if k.startswith("QLinear") and k not in INT_KERNELS},
        "dq": ops["DequantizeLinear"],
        "q": ops["QuantizeLinear"],
    }


def _const_value(g: onnx.GraphProto, name: str) -> np.ndarray | None:
    for t in g.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return onnx.numpy_helper.to_array(a.t)
    return None


def _zp_type(g: onnx.GraphProto, qdq: onnx.NodeProto) -> str:
    if len(qdq.input) < 3 or not qdq.input[2]:
        return "uint8"
    v = _const_value(g, qdq.input[2])
    return str(v.dtype) if v is not None else "?"


def _dq_readers(cons: dict[str, list[onnx.NodeProto]], q: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The nodes reading the dequantized value of Q ``q`` (through every DQ of it)."""
    out = []
    for dq in cons.get(q.output[0], []):
        if dq.op_type == "DequantizeLinear":
            out += cons.get(dq.output[0], [])
        else:
            out.append(dq)
    return out


def diagnose_node(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[list[str], str]:
    """(reasons, 'what reads the output') for a quantized node ORT left in float, from the variant's
    own graph (before ORT's optimizations)."""
    g = model.graph
    prod, cons = _producers(g), _consumers(g)
    graph_outputs = {o.name for o in g.output}
    reasons: list[str] = []
    if node.op_type == "ConvTranspose":  # ORT 1.32's CPU EP registers no QDQ rule for it
        reasons.append("ConvTranspose: ORT's CPU EP has no QDQ fusion for it (float whatever the placement)")
    x = node.input[0]
    px = prod.get(x)
    # ---- input side
    if px is None or px.op_type != "DequantizeLinear":
        feeders = {prod[i].op_type for i in (px.input if px is not None else []) if i in prod}
        if px is not None and px.op_type == "Mul" and feeders & {"Clip", "Round"}:
            reason = "input is onnxcomp's dynamic fake-quant subgraph (plain Abs/ReduceMax/Div/Round/Clip/Mul: no ORT fusion)"
        elif px is not None and px.op_type == "DynamicQuantizeLinear":
            reason = "input from DynamicQuantizeLinear"
        else:
            reason = "activation input not quantized (weight-only: float op on a DequantizeLinear weight)"
        read_by = "+".join(sorted({u.op_type for u in cons.get(node.output[0], [])})) or "(nothing)"
        return [reason], read_by
    else:
        q_in = prod.get(px.input[0])
        readers = len(cons.get(x, []))
        if q_in is not None and q_in.op_type == "QuantizeLinear":
            readers = len(_dq_readers(cons, q_in))
        if readers > 1 and _zp_type(g, px) == "int8":
            reasons.append("int8 input Q/DQ read by >1 node (Q stays int8 on x86)")
    # ---- output side
    out = node.output[0]
    users = cons.get(out, [])
    act = None
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip") and out not in graph_outputs:
        act = users[0]
        out = act.output[0]
        users = cons.get(out, [])
    qs = [u for u in users if u.op_type == "QuantizeLinear"]
    if out in graph_outputs or node.output[0] in graph_outputs:
        reasons.append("output is a graph output")
    if not qs:
        readers = sorted({u.op_type for u in users}) or ["(nothing)"]
        reasons.append("no Q on output")
        read_by = "+".join(readers)
    else:
        q = qs[0]
        readers_nodes = _dq_readers(cons, q)
        read_by = "Q->DQ->" + "+".join(sorted({u.op_type for u in readers_nodes}) or ["(nothing)"])
        if len(users) > 1:
            reasons.append("output read by Q and by float nodes")
        if len(readers_nodes) > 1 and _zp_type(g, q) == "int8":
            reasons.append("int8 output Q/DQ read by >1 node (Q stays int8 on x86)")
        if act is not None:
            zp = _const_value(g, q.input[2]) if len(q.input) > 2 and q.input[2] else np.uint8(0)
            lo = np.iinfo(zp.dtype).min if zp is not None and zp.dtype.kind in "iu" else 0
            if act.op_type == "Relu" and zp is not None and int(np.asarray(zp).reshape(-1)[0]) != lo:
                reasons.append("Relu before Q whose zero point is not the grid minimum")
            if act.op_type == "Clip":
                reasons.append("Clip before Q (removable only if the Q range lies inside the clip range)")
        if act is not None:
            read_by = f"{act.op_type}->" + read_by
    # ---- bias
    if (
        node.op_type in ("Conv", "Gemm")
        and len(node.input) > 2
        and node.input[2]
        and not qs
        and (node.input[2] not in prod or prod[node.input[2]].op_type != "DequantizeLinear")
    ):
        reasons.append("float bias and no output Q (ORT quantizes a bias only on a path to a Q)")
    # ---- bias scale
    if (
        node.op_type in ("Conv", "Gemm")
        and len(node.input) > 2
        and node.input[2] in prod
        and prod[node.input[2]].op_type == "DequantizeLinear"
        and px is not None
        and px.op_type == "DequantizeLinear"
        and node.input[1] in prod
    ):
        bdq, wdq = prod[node.input[2]], prod[node.input[1]]
        bs, xs, ws = (_const_value(g, n.input[1]) for n in (bdq, px, wdq))
        if bs is not None and xs is not None and ws is not None:
            if not np.allclose(
                np.asarray(bs, np.float64), np.asarray(xs, np.float64) * np.asarray(ws, np.float64), rtol=1e-5, atol=0
            ):
                reasons.append("int32 bias scale != x_scale * w_scale")
    return reasons or ["other (not classified)"], read_by


def diagnose(model: onnx.ModelProto, counts: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per float-left node: name, op, reasons, what reads its output."""
    by_name = {n.name: n for n in model.graph.node if n.name}
    by_weight = {}
    for n in model.graph.node:
        if n.op_type in FLOAT_TARGETS and len(n.input) > 1:
            by_weight.setdefault(n.input[1], n)
    records = []
    for name, op, inputs in counts["float_fed_nodes"]:
        node = by_name.get(name)
        if node is None or node.op_type not in FLOAT_TARGETS:
            node = next((by_weight[i] for i in inputs[1:2] if i in by_weight), None)
        if node is None:
            records.append(
                {"node": name, "op": op, "reasons": ["created by ORT (no source node found)"], "read_by": "?"}
            )
            continue
        reasons, read_by = diagnose_node(model, node)
        records.append({"node": node.name, "op": node.op_type, "ort_op": op, "reasons": reasons, "read_by": read_by})
    return records


# ============================================================================================
# Measuring one model
# ============================================================================================


@dataclass
class Result:
    variant: str
    note: str = ""
    path: str = ""
    build_s: float = float("nan")
    size_mb: float = float("nan")
    error: str = ""
    counts: dict[str, Any] = field(default_factory=dict)
    diagnosis: list[dict[str, Any]] = field(default_factory=list)
    quantized_nodes: int = 0  # Conv/MatMul/Gemm fed by a DQ weight in the variant's own graph
    lat: dict[int, dict[str, float]] = field(default_factory=dict)  # threads -> {median, p10, runs}
    cosine: float = float("nan")


def _quantized_nodes(model: onnx.ModelProto) -> int:
    prod = _producers(model.graph)
    return sum(
        1
        for n in model.graph.node
        if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")
        and len(n.input) > 1
        and n.input[1] in prod
        and prod[n.input[1]].op_type == "DequantizeLinear"
    )


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / d) if d else float("nan")


def bench_model(
    spec: ModelSpec, variants: list[Variant], work: Path, runs: int, budget_s: float, log: Callable[[str], None]
) -> list[Result]:
    results: list[Result] = []
    for v in variants:
        r = Result(v.label, v.note)
        out = work / f"{spec.name}.{v.label.replace(' ', '_').replace('/', '_')}.onnx"
        t0 = time.perf_counter()
        try:
            path = v.build(spec, out)
            r.build_s = time.perf_counter() - t0
            r.path = str(path)
            r.size_mb = sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*")) / 1e6
            model = onnx.load(str(path))
            opt = common.ort_optimized_model(str(path))
            r.counts = kernel_counts(opt)
            r.quantized_nodes = _quantized_nodes(model)
            if r.counts["float_fed_by_dq"]:
                r.diagnosis = diagnose(model, r.counts)
            log(
                f"  {spec.name} / {v.label}: built in {r.build_s:.1f} s; int kernels {r.counts['int_kernels']}; "
                f"float<-DQ {r.counts['float_fed_by_dq']}"
            )
        except Exception as exc:  # noqa: BLE001 - one broken variant must not stop the bench
            r.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            log(f"  {spec.name} / {v.label}: ERROR {r.error}")
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
        results.append(r)
    ok = [r for r in results if not r.error]
    # sessions: every ok variant x thread count, timed in one round-robin loop
    sessions, keys = [], []
    for r in ok:
        for t in THREADS:
            try:
                sessions.append(common.ort_session(r.path, threads=t))
                keys.append((r, t))
            except Exception as exc:  # noqa: BLE001
                r.error = f"session: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                break
    keep = [i for i, (r, _) in enumerate(keys) if not r.error]
    sessions, keys = [sessions[i] for i in keep], [keys[i] for i in keep]
    # cosine of the primary output vs fp32 (1-thread sessions)
    ref = None
    for s, (r, t) in zip(sessions, keys):
        if t != 1:
            continue
        y = s.run([spec.primary_output], spec.feeds)[0]
        if ref is None and r.variant == "fp32":
            ref = y
        if ref is not None:
            r.cosine = _cos(ref, y)
    log(f"  {spec.name}: timing {len(sessions)} sessions round-robin (<= {runs} rounds, budget {budget_s:.0f} s)")
    stats = common.interleaved_latency_stats(sessions, spec.feeds, runs=runs, warmup=3, budget_s=budget_s)
    for st, (r, t) in zip(stats, keys):
        r.lat[t] = {"median": st.median, "p10": st.p10, "runs": len(st.times_ms)}
    del sessions
    return results


# ============================================================================================
# Output
# ============================================================================================


def _kernels_text(c: dict[str, Any]) -> str:
    if not c:
        return "-"
    return ", ".join(f"{SHORT[k]} {v}" for k, v in c.get("int_kernels", {}).items()) or "none"


def model_table(spec: ModelSpec, results: list[Result]) -> str:
    base = next((r for r in results if r.variant == "fp32" and r.lat), None)
    fused = next((r for r in results if r.variant == "fp32 fused" and r.lat), None)
    headers = [
        "variant",
        "1T med ms",
        "1T p10",
        "2T med ms",
        "2T p10",
        "x fp32 (1T/2T)",
        "p10 x fused",
        "cos",
        "int kernels",
        "float<-DQ",
        "other QLinear",
        "Q/DQ",
        "MB",
    ]
    rows = []
    for r in results:
        if r.error:
            rows.append([r.variant, "ERROR", r.error[:80], "", "", "", "", "", "", "", "", "", ""])
            continue
        l1, l2 = r.lat.get(1, {}), r.lat.get(2, {})
        ratio = "-"
        if base is not None and l1 and l2:
            ratio = f"{l1['median'] / base.lat[1]['median']:.2f} / {l2['median'] / base.lat[2]['median']:.2f}"
        vs_fused = "-"
        if fused is not None and l1 and l2:
            vs_fused = f"{l1['p10'] / fused.lat[1]['p10']:.2f} / {l2['p10'] / fused.lat[2]['p10']:.2f}"
        other = ", ".join(f"{k.replace('QLinear', 'QL')} {v}" for k, v in r.counts.get("other_qlinear", {}).items())
        fd = r.counts.get("float_fed_by_dq", 0)
        rows.append(
            [
                r.variant,
                common.fmt(l1.get("median"), 2),
                common.fmt(l1.get("p10"), 2),
                common.fmt(l2.get("median"), 2),
                common.fmt(l2.get("p10"), 2),
                ratio,
                vs_fused,
                common.fmt(r.cosine, 4),
                _kernels_text(r.counts),
                f"{fd} of {r.quantized_nodes}" if r.quantized_nodes else str(fd),
                other or "-",
                f"{r.counts.get('q', 0)}/{r.counts.get('dq', 0)}",
                common.fmt(r.size_mb, 1),
            ]
        )
    runs = sorted({r.lat[1]["runs"] for r in results if r.lat.get(1)})
    head = f"### {spec.name}: {spec.desc}; {'/'.join(map(str, runs))} interleaved rounds\n\n"
    return head + common.markdown_table(headers, rows, "lrrrrrrrlllrr")


def diagnosis_text(spec: ModelSpec, results: list[Result], top: int = 6) -> str:
    lines = []
    for r in results:
        if not r.diagnosis:
            continue
        reasons = Counter(reason for d in r.diagnosis for reason in d["reasons"])
        read_by = Counter(d["read_by"] for d in r.diagnosis)
        lines.append(
            f"* {spec.name} / **{r.variant}**: {len(r.diagnosis)} quantized nodes left in float "
            f"({', '.join(f'{k} {v}' for k, v in Counter(d['op'] for d in r.diagnosis).items())})"
        )
        lines.append("  * why: " + "; ".join(f"{k} ({v})" for k, v in reasons.most_common(top)))
        lines.append("  * output read by: " + "; ".join(f"{k} ({v})" for k, v in read_by.most_common(top)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated (default {','.join(DEFAULT_MODELS)}; also {','.join(m for m in MODELS if m not in DEFAULT_MODELS)})",
    )
    p.add_argument("--variants", default="", help="comma-separated labels to keep (default: all)")
    p.add_argument(
        "--extra", action="store_true", help="also run EXTRA_VARIANTS: " + ", ".join(v.label for v in EXTRA_VARIANTS)
    )
    p.add_argument("--quick", action="store_true", help="smaller inputs and calibration sets, fewer rounds")
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help="max interleaved rounds per model (default 300, quick 100; the budget usually stops first)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="timing budget per model in s (default 45, quick 12); at least 5 rounds",
    )
    p.add_argument("--json", type=Path, default=None, help="also write all results and the per-node diagnosis here")
    p.add_argument("--keep", type=Path, default=None, help="keep the built models in this folder")
    args = p.parse_args(argv)

    variants = VARIANTS + (EXTRA_VARIANTS if args.extra else [])
    if args.variants:
        wanted = [s.strip() for s in args.variants.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {v.label for v in variants}]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {[v.label for v in variants]}")
        variants = [v for v in variants if v.label in wanted]
        if "fp32" not in wanted:
            variants.insert(0, VARIANTS[0])  # the ratios need fp32
    runs = args.runs or (100 if args.quick else 300)
    budget = args.budget or (12.0 if args.quick else 45.0)
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start, load0 = time.perf_counter(), common.load_average()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    out_md = [
        "## ORT CPU latency of quantized models (issue 11)",
        "",
        common.environment_line(["onnx", "onnxruntime", "onnxcomp", "numpy"]),
        "",
    ]
    everything: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    diag_lines = []
    try:
        for name in models:
            log(f"{name}: loading inputs")
            spec = load_spec(name, args.quick)
            results = bench_model(spec, variants, work, runs, budget, log)
            out_md += [model_table(spec, results), ""]
            d = diagnosis_text(spec, results)
            if d:
                diag_lines.append(d)
            everything["models"][name] = {
                "desc": spec.desc,
                "results": [
                    {k: v for k, v in r.__dict__.items() if k != "counts"}
                    | {"counts": {k: v for k, v in r.counts.items() if k != "float_fed_nodes"}}
                    for r in results
                ],
            }
            print(out_md[-2], "\n", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if diag_lines:
        out_md += ["### Why quantized nodes stay float (from each variant's graph before ORT)", "", *diag_lines, ""]
    out_md.append(
        f"Columns: median / 10th percentile of `session.run` (ms) at 1 and 2 intra-op threads, all variants "
        f"and thread counts of a model timed round-robin in the same rounds; `x fp32` = median / fp32 median; `p10 x fused` = "
        f"p10 / p10 of `fp32 fused` (onnxcomp.fuse also flushes denormal weights, which slow ORT's fp32 "
        f"kernels: ppocr_det ships 10 % denormal weights); "
        f"`cos` = cosine of the primary output vs fp32; `int kernels` = fused integer kernels in ORT's "
        f"ORT_ENABLE_ALL graph; `float<-DQ` = Conv/MatMul/Gemm/Fused* nodes ORT still runs in float fed by a "
        f"DequantizeLinear (of N = nodes with a DQ weight in the variant's graph); `Q/DQ` = QuantizeLinear/"
        f"DequantizeLinear nodes left. Total {time.perf_counter() - t_start:.0f} s; load average "
        f"{load0} at start, {common.load_average()} at end."
    )
    text = "\n".join(out_md)
    print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1, default=float))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
