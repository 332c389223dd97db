"""Accuracy algorithms of ``onnxcomp.quantize``, each on and off, alone and combined, against
``onnxruntime.quantization`` at matched settings: task metric on held-out inputs and quantize time.

Run from the repo root::

    .venv/bin/python bench/algorithms.py            # 13 min of CPU; 37 min wall at load 11 on 2 cores
    .venv/bin/python bench/algorithms.py --quick    # smoke run: fewer samples, fewer rows
    .venv/bin/python bench/algorithms.py --only minilm_l3 --no-readme

Models: the demo digits CNN, ppocr_cls (MobileNetV3 text-direction classifier), ppocr_rec (OCR
recognizer: conv backbone + 2 transformer blocks) and minilm_l3 (BERT sentence encoder).
Calibration and evaluation inputs come from different seeds (minilm_l3: the held-out sentences
exclude every calibration sentence).

Settings, per model:

- W8A8 (int8 weights per channel, uint8 activations per tensor, onnxcomp's defaults): the
  default histogram observer, ``observer=minmax``, and on top of the defaults
  ``bias_correction`` full / fast, ``smoothquant`` 0.5 / auto, ``equalize`` (CNNs),
  ``weight_algorithm=gptq``, and the combinations smoothquant auto + bias correction and
  equalize + bias correction (CNNs). onnxruntime: ``quantize_static`` QDQ with its MinMax,
  Entropy and Percentile calibrators, int8 per-channel weights, uint8 activations (bench/ptq.py's child).
- W4 weight-only, int4 symmetric groups of 32 on the MatMul/Gemm weights (minilm_l3, ppocr_rec):
  RTN (onnxcomp's default MSE clipping search, and the plain amax scale), gptq, gptq + act_order,
  awq. onnxruntime: ``MatMulNBitsQuantizer`` (its default RTN, its ``k_quant``, and its GPTQ, which
  needs torch and is reported as unavailable without it).

Every quantization runs in a fresh subprocess (``bench/_common.py``'s ``run_child``, the ORT children
are bench/ptq.py's); quant time is the wall time around the quantization call inside it (onnxcomp:
``reports=False``, so no SQNR / kernel report; its fusions, algorithms and output validation are
included; ORT's static flow includes its ``quant_pre_process``), peak RSS the child's VmHWM. The
metric is measured in this process with onnxruntime CPU (ORT_ENABLE_ALL).

The result replaces the "## Accuracy algorithms" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _common as common  # noqa: E402 - after the sys.path insert
import ptq  # noqa: E402 - bench/ptq.py: the ORT children and the side path of ORT's optional deps

from onnxcomp.analysis.metrics import cosine, predict  # noqa: E402

README = REPO / "bench" / "README.md"
SECTION = "## Accuracy algorithms"
PERCENTILE = ptq.PERCENTILE
W4_OPS = ["MatMul", "Gemm"]  # ORT's MatMulNBitsQuantizer quantizes MatMul weights only


# ============================================================================================
# Child side
# ============================================================================================


def child_onnxcomp(task: dict[str, Any]) -> dict[str, Any]:
    """``onnxcomp.quantize(model, out, **task["kw"])``, calibrated on ``task["calib"]`` if given."""
    ptq._imports("onnxcomp")
    import onnxcomp.api as api

    kw = dict(task["kw"])
    data = ptq._load_npz(task.get("calib"), task.get("n"))
    if data:
        kw.update(calibration=data, calib_samples=task["n"], batch_size=task["bs"])
    start = time.perf_counter()
    report = api.quantize(task["model"], task["out"], reports=False, force=True, **kw)
    elapsed = time.perf_counter() - start
    return {"time_s": elapsed, "quantized_nodes": report.result("quantize").stats.get("nodes", 0)}


HANDLERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "onnxcomp": child_onnxcomp,
    "ort_static": ptq.child_ort_static,
    "ort_nbits": ptq.child_ort_nbits,
}


# ============================================================================================
# Parent side
# ============================================================================================


@dataclass
class Setting:
    group: str  # "W8A8" | "W4"
    label: str
    tool: str  # "onnxcomp" | "onnxruntime"
    task: dict[str, Any]
    algo: str = ""  # the algorithm this row switches on (for the reading), "" for baselines
    env: str = "onnxcomp"  # onnxcomp | ort | ort_nbits


@dataclass
class Row:
    setting: Setting
    time_s: float = float("nan")
    peak_mb: float = float("nan")
    m1: float = float("nan")
    m2: float = float("nan")
    error: str = ""


@dataclass
class ModelSpec:
    key: str
    title: str
    src: str
    calib: str
    n: int
    bs: int
    cnn: bool
    int4: bool
    text: str  # calibration and evaluation, one sentence
    m1_name: str
    m2_name: str
    evaluate: Callable[[str], tuple[float, float]]
    err: Callable[[float, float], float]  # (m1, m2) -> an error vs fp32 (lower is better)
    err_name: str
    floor: float = 0.0  # error changes below this are noise ("same")
    digits: tuple[int, int] = (2, 5)
    rows: list[Row] = field(default_factory=list)
    fp32: tuple[float, float] = (float("nan"), float("nan"))


def _out(spec: ModelSpec, work: Path, name: str) -> str:
    return str(work / f"{spec.key}.{name}.onnx")


def _rows_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def build_models(work: Path, quick: bool) -> list[ModelSpec]:
    from models.fetch import MODELS, ctc_decode, fetch, make_inputs, sentences, tokenize

    specs: list[ModelSpec] = []

    # ---- demo digits CNN --------------------------------------------------------------------
    src = str(REPO / "models" / "digits_cnn.onnx")
    held = dict(np.load(REPO / "models" / "digits_heldout.npz"))
    ref = predict(common.as_proto(src), {"input": held["input"]}, batch=540, threads=2)

    def eval_digits(path: str) -> tuple[float, float]:
        logits = predict(common.as_proto(path), {"input": held["input"]}, batch=540, threads=2)
        return float((logits.argmax(1) == held["label"]).mean() * 100), cosine(ref, logits)

    n = 64 if quick else 128
    specs.append(
        ModelSpec(
            "digits_cnn",
            "Demo digits CNN (`models/digits_cnn.onnx`)",
            src,
            str(REPO / "models" / "digits_calib.npz"),
            n,
            16,
            cnn=True,
            int4=False,
            text=f"calibration: {n} images of `digits_calib.npz`; metric: top-1 on the 540 held-out images of "
            "`digits_heldout.npz` (1 image = 0.19 points) and the logits' cosine vs fp32",
            m1_name="top-1 %",
            m2_name="logits cos",
            evaluate=eval_digits,
            err=lambda m1, m2: 1.0 - m2,
            err_name="1 - logits cos",
            floor=1e-5,
        )
    )

    # ---- ppocr_cls ----------------------------------------------------------------------------
    cls = str(fetch("ppocr_cls"))
    n, n_eval = (16, 64) if quick else (32, 256)
    np.savez(work / "calib_cls.npz", **make_inputs("ppocr_cls", n, seed=1))
    held_cls, meta_cls = make_inputs("ppocr_cls", n_eval, seed=2, return_meta=True)
    cls_out = MODELS["ppocr_cls"]["primary_output"]
    ref_cls = predict(common.as_proto(cls), held_cls, batch=64, output=cls_out, threads=2)

    def eval_cls(path: str) -> tuple[float, float]:
        p = predict(common.as_proto(path), held_cls, batch=64, output=cls_out, threads=2)
        return float((p.argmax(1) == meta_cls["labels"]).mean() * 100), float(np.abs(p - ref_cls)[:, 1].mean())

    specs.append(
        ModelSpec(
            "ppocr_cls",
            "`ppocr_cls` (MobileNetV3 text-direction classifier, 0/180 degrees)",
            cls,
            str(work / "calib_cls.npz"),
            n,
            16,
            cnn=True,
            int4=False,
            text=f"calibration: {n} text lines (seed 1); metric: top-1 vs the 0/180 labels of {n_eval} held-out "
            f"lines (seed 2; 1 line = {100 / n_eval:.2g} points) and the mean |p(180) - p_fp32(180)|",
            m1_name="top-1 %",
            m2_name="mean abs dp",
            evaluate=eval_cls,
            err=lambda m1, m2: m2,
            err_name="mean abs dp",
            floor=1e-3,
        )
    )

    # ---- ppocr_rec ----------------------------------------------------------------------------
    rec = str(fetch("ppocr_rec"))
    n, n_eval = (8, 16) if quick else (8, 32)
    np.savez(work / "calib_rec.npz", **make_inputs("ppocr_rec", n, seed=1))
    held_rec, meta_rec = make_inputs("ppocr_rec", n_eval, seed=2, return_meta=True)
    rec_out = MODELS["ppocr_rec"]["primary_output"]
    ref_rec = predict(common.as_proto(rec), held_rec, batch=16, output=rec_out, threads=2)

    def eval_rec(path: str) -> tuple[float, float]:
        probs = predict(common.as_proto(path), held_rec, batch=16, output=rec_out, threads=2)
        return common.char_accuracy(ctc_decode(probs, rec), meta_rec["texts"]), cosine(ref_rec, probs)

    specs.append(
        ModelSpec(
            "ppocr_rec",
            "`ppocr_rec` (PP-OCRv6 small recognizer: conv backbone + 2 transformer blocks, CTC)",
            rec,
            str(work / "calib_rec.npz"),
            n,
            8,
            cnn=True,
            int4=True,
            text=f"calibration: {n} text lines 48x320 (seed 1); metric: character accuracy (1 - edit distance / "
            f"length) of the greedy CTC decode of {n_eval} held-out lines (seed 2) vs the ground truth, and the "
            "cosine of the per-frame character probabilities vs fp32",
            m1_name="char acc %",
            m2_name="probs cos",
            evaluate=eval_rec,
            err=lambda m1, m2: 1.0 - m2,
            err_name="1 - probs cos",
            floor=1e-4,
        )
    )

    # ---- minilm_l3 ----------------------------------------------------------------------------
    lm = str(fetch("minilm_l3"))
    n, n_eval = (16, 48) if quick else (16, 96)
    cal_texts = sentences(n, seed=0)
    cal_lm: dict[str, Any] = tokenize(cal_texts)
    np.savez(work / "calib_lm.npz", **cal_lm)
    seen = set(cal_texts)
    eval_texts = [s for s in sentences(n_eval + n, seed=1) if s not in seen][:n_eval]
    held_lm = tokenize(eval_texts)
    lm_out = MODELS["minilm_l3"]["primary_output"]
    ref_lm = predict(common.as_proto(lm), held_lm, batch=32, output=lm_out, threads=2)

    def eval_lm(path: str) -> tuple[float, float]:
        cos = _rows_cos(ref_lm, predict(common.as_proto(path), held_lm, batch=32, output=lm_out, threads=2))
        return float(cos.mean()), float(cos.min())

    specs.append(
        ModelSpec(
            "minilm_l3",
            "`minilm_l3` (paraphrase-MiniLM-L3-v2 sentence encoder)",
            lm,
            str(work / "calib_lm.npz"),
            n,
            16,
            cnn=False,
            int4=True,
            text=f"calibration: {n} sentences (seed 0); metric: cosine of the sentence embedding `{lm_out}` vs fp32 "
            f"on {len(eval_texts)} held-out sentences (seed 1, none of them in the calibration set; "
            f"{held_lm['input_ids'].shape[1]} tokens), mean and minimum",
            m1_name="mean cos",
            m2_name="min cos",
            evaluate=eval_lm,
            err=lambda m1, m2: 1.0 - m1,
            err_name="1 - mean cos",
            floor=2e-4,
            digits=(5, 5),
        )
    )
    return specs


def plan(spec: ModelSpec, work: Path, quick: bool) -> list[Setting]:
    cal = {"model": spec.src, "calib": spec.calib, "n": spec.n, "bs": spec.bs}
    out: list[Setting] = []

    def oc(group: str, label: str, name: str, kw: dict[str, Any], algo: str = "", calibrated: bool = True) -> None:
        task = {**(cal if calibrated else {"model": spec.src}), "kind": "onnxcomp", "kw": kw}
        out.append(Setting(group, label, "onnxcomp", {**task, "out": _out(spec, work, name)}, algo))

    # ---- W8A8 ------------------------------------------------------------------------------
    oc("W8A8", "defaults (histogram observer)", "default", {})
    oc("W8A8", "observer=minmax", "minmax", {"observer": "minmax"}, "observer=minmax")
    if spec.cnn:
        oc("W8A8", "observer=minmax, placement=all", "minmax_all", {"observer": "minmax", "placement": "all"})
    oc("W8A8", "+ bias_correction=full", "bc_full", {"bias_correction": "full"}, "bias_correction=full")
    oc("W8A8", "+ bias_correction=fast", "bc_fast", {"bias_correction": "fast"}, "bias_correction=fast")
    oc("W8A8", "+ smoothquant=0.5", "sq05", {"smoothquant": 0.5}, "smoothquant=0.5")
    oc("W8A8", "+ smoothquant=auto", "sqauto", {"smoothquant": "auto"}, "smoothquant=auto")
    if spec.cnn:
        oc("W8A8", "+ equalize", "eq", {"equalize": True}, "equalize")
    if not quick:
        oc("W8A8", "+ weight_algorithm=gptq", "gptq8", {"weight_algorithm": "gptq"}, "gptq (W8A8)")
    oc(
        "W8A8",
        "+ smoothquant=auto + bias_correction=full",
        "sqauto_bc",
        {"smoothquant": "auto", "bias_correction": "full"},
        "smoothquant=auto + bias_correction=full",
    )
    if spec.cnn:
        oc(
            "W8A8",
            "+ equalize + bias_correction=full",
            "eq_bc",
            {"equalize": True, "bias_correction": "full"},
            "equalize + bias_correction=full",
        )
    calibrators = ("minmax", "entropy") if quick else ("minmax", "entropy", "percentile")
    for obs in calibrators:
        opts = {"percentile": PERCENTILE} if obs == "percentile" else {}
        name = {"minmax": "MinMax", "entropy": "Entropy", "percentile": f"Percentile {PERCENTILE:g}"}[obs]
        task = {**cal, "kind": "ort_static", "observer": obs, "observer_options": opts, "act_dtype": "uint8"}
        out.append(
            Setting("W8A8", f"QDQ, {name}", "onnxruntime", {**task, "out": _out(spec, work, f"ort_{obs}")}, env="ort")
        )

    # ---- W4 weight-only ----------------------------------------------------------------------
    if spec.int4:
        w4 = {"weights": "int4", "granularity": "group:32", "activations": "none", "config": {"ops": W4_OPS}}
        oc("W4", "RTN (MSE clipping search, the default)", "w4_rtn", w4, calibrated=False)
        oc(
            "W4",
            "RTN, weight_observer=minmax (amax scale)",
            "w4_amax",
            {**w4, "weight_observer": "minmax"},
            calibrated=False,
        )
        oc("W4", "gptq", "w4_gptq", {**w4, "weight_algorithm": "gptq"}, "gptq (W4)")
        oc(
            "W4",
            "gptq + act_order",
            "w4_gptq_ao",
            {**w4, "weight_algorithm": "gptq", "act_order": True},
            "gptq + act_order (W4)",
        )
        oc("W4", "awq", "w4_awq", {**w4, "weight_algorithm": "awq"}, "awq (W4)")
        for algo, label in (
            ("rtn", "MatMulNBits, RTN (default)"),
            ("k_quant", "MatMulNBits, k_quant"),
            ("gptq", "MatMulNBits, GPTQ"),
        ):
            task = {
                **cal,
                "kind": "ort_nbits",
                "algorithm": algo,
                "block": 32,
                "out": _out(spec, work, f"ort_w4_{algo}"),
            }
            out.append(Setting("W4", label, "onnxruntime", task, env="ort_nbits"))
    return out


def run(spec: ModelSpec, settings: list[Setting], peer_env: dict[str, str], log: Callable[[str], None]) -> None:
    spec.fp32 = spec.evaluate(spec.src)
    log(f"  fp32: {spec.m1_name} {spec.fp32[0]:.5g}, {spec.m2_name} {spec.fp32[1]:.5g}")
    for s in settings:
        row = Row(s)
        res = common.run_child(__file__, s.task, env=peer_env if s.env != "onnxcomp" else None, timeout=900)
        if res.ok:
            row.time_s, row.peak_mb = res.result["time_s"], res.peak_rss_mb
            row.m1, row.m2 = spec.evaluate(s.task["out"])
            os.remove(s.task["out"])
        else:
            row.error = res.error
        spec.rows.append(row)
        log(
            f"  {s.group} {s.label:48s} {s.tool:11s} {row.time_s:6.2f} s {row.peak_mb:5.0f} MB  "
            f"{row.m1:.5g} / {row.m2:.5g} {row.error}"
        )


# ---- report ---------------------------------------------------------------------------------


def table(spec: ModelSpec) -> str:
    d1, d2 = spec.digits
    headers = ["weights / acts", "setting", "tool", "quant time s", "peak RSS MB", spec.m1_name, spec.m2_name]
    rows: list[list[Any]] = [
        ["fp32", "reference", "-", "-", "-", common.fmt(spec.fp32[0], d1), common.fmt(spec.fp32[1], d2)]
    ]
    for r in spec.rows:
        s = r.setting
        group = "W8A8" if s.group == "W8A8" else "W4 g32 (MatMul)"
        if r.error:
            rows.append([group, s.label, s.tool, f"unavailable: {r.error}", "-", "-", "-"])
            continue
        rows.append(
            [
                group,
                s.label,
                s.tool,
                common.fmt(r.time_s),
                common.fmt(r.peak_mb, 0),
                common.fmt(r.m1, d1),
                common.fmt(r.m2, d2),
            ]
        )
    return common.markdown_table(headers, rows, "lllrrrr")


def _base_row(spec: ModelSpec, group: str) -> Row | None:
    label = "defaults (histogram observer)" if group == "W8A8" else "RTN (MSE clipping search, the default)"
    return next((r for r in spec.rows if r.setting.label == label and not r.error), None)


def reading(specs: list[ModelSpec]) -> str:
    """Per algorithm: on which models it lowered / raised the error vs fp32 against the default
    (W8A8 defaults, or W4 RTN), by how much, and at what quantize-time cost; then ORT vs onnxcomp."""
    effects: dict[str, list[str]] = {}
    verdict: dict[str, list[int]] = {}
    for spec in specs:
        for r in spec.rows:
            s = r.setting
            base = _base_row(spec, s.group)
            if not s.algo or r.error or base is None:
                continue
            e0, e1 = spec.err(base.m1, base.m2), spec.err(r.m1, r.m2)
            ratio = e1 / e0 if e0 > 0 else (1.0 if e1 == 0 else float("inf"))
            sign = 0 if abs(e1 - e0) <= spec.floor else 1 if ratio < 0.9 else -1 if ratio > 1.1 else 0
            verdict.setdefault(s.algo, []).append(sign)
            word = {1: "better", -1: "worse", 0: "same"}[sign]
            d1 = spec.digits[0]
            effects.setdefault(s.algo, []).append(
                f"{spec.key} {word} ({spec.err_name} {e0:.3g} -> {e1:.3g}; {spec.m1_name} "
                f"{base.m1:.{d1}f} -> {r.m1:.{d1}f}; {r.time_s / base.time_s:.1f}x the time)"
            )
    lines = [
        "Per algorithm, against the default of its block (W8A8 defaults, or W4 RTN) on the same model: "
        "*better* / *worse* when the error vs fp32 (from the second metric, more sensitive than the task metric "
        "on these small held-out sets) moves by more than 10 % and more than a noise floor (digits 1e-5, "
        "ppocr_cls 1e-3, ppocr_rec 1e-4, minilm_l3 2e-4):",
        "",
    ]
    for algo, items in effects.items():
        v = verdict[algo]
        lines.append(
            f"- **{algo}**: better on {v.count(1)}, worse on {v.count(-1)} of {len(v)}: " + "; ".join(items) + "."
        )
    lines += ["", "onnxcomp's best vs onnxruntime's best per block (task metric, then quantize time):", ""]
    for spec in specs:
        d1 = spec.digits[0]
        for group in ("W8A8", "W4"):
            ok = [r for r in spec.rows if r.setting.group == group and not r.error]
            oc_rows = [r for r in ok if r.setting.tool == "onnxcomp"]
            ort_rows = [r for r in ok if r.setting.tool == "onnxruntime"]
            if not oc_rows or not ort_rows:
                continue
            best_oc = min(oc_rows, key=lambda r: (spec.err(r.m1, r.m2), r.time_s))
            best_ort = min(ort_rows, key=lambda r: (spec.err(r.m1, r.m2), r.time_s))
            base = _base_row(spec, group)
            base_txt = (
                f"; onnxcomp's default {base.m1:.{d1}f} in {base.time_s:.2f} s"
                if base is not None and base is not best_oc
                else ""
            )
            lines.append(
                f"- {spec.key} {group}: onnxcomp `{best_oc.setting.label}` {best_oc.m1:.{d1}f} "
                f"({spec.err_name} {spec.err(best_oc.m1, best_oc.m2):.3g}) in {best_oc.time_s:.2f} s vs ORT "
                f"`{best_ort.setting.label}` {best_ort.m1:.{d1}f} ({spec.err(best_ort.m1, best_ort.m2):.3g}) in "
                f"{best_ort.time_s:.2f} s{base_txt}."
            )
    return "\n".join(lines)


def render(specs: list[ModelSpec], args: argparse.Namespace, runtime_s: float, load: tuple[str, str]) -> str:
    env = common.environment_line(["onnxcomp", "onnx", "onnxruntime", "numpy", "torch"])
    flag = " --quick" if args.quick else ""
    out = [
        "Every accuracy algorithm of `onnxcomp.quantize` alone and combined, against `onnxruntime.quantization` at "
        "matched settings, on held-out inputs (calibration and evaluation from different seeds). W8A8 = int8 "
        "weights symmetric per output channel, uint8 activations asymmetric per tensor (onnxcomp's defaults: "
        "histogram observer, placement speed, MatMul outputs left float; ORT: `quantize_static` QDQ, per-channel, "
        "`QUInt8` activations, the Conv/Gemm/MatMul ops with a constant weight). W4 = weight-only int4 "
        "symmetric, groups of 32 along the reduction axis, on the MatMul/Gemm weights only (what ORT's "
        '`MatMulNBitsQuantizer` quantizes; onnxcomp with `ops = ["MatMul", "Gemm"]`), written as MatMulNBits '
        "by both. `+` rows add options to the W8A8 defaults.",
        "",
        "```sh",
        f".venv/bin/python bench/algorithms.py{flag}",
        "```",
        "",
        f"{env} This run: {runtime_s / 60:.1f} min; 1-minute load average {load[0]} at the start, {load[1]} at "
        "the end (a shared machine: times are indicative).",
        "",
        "- **quant time**: wall time of the quantization call in a fresh subprocess (onnxcomp with `reports=False`: "
        "fusions, calibration, the algorithms, writing and validating the output; ORT: opset upgrade, "
        "`quant_pre_process`, calibration and writing). **peak RSS**: that subprocess's VmHWM (imports and data "
        "included).",
        "- ORT's GPTQ (`GPTQWeightOnlyQuantConfig`: damping 0.01, column blocks of 128, no act_order) converts its "
        "calibration batches with torch (imported inside its timed call), which neither onnxruntime nor the "
        "project depends on: without torch in the environment its rows read unavailable. ORT's "
        "`MatMulNBitsQuantizer` needs `onnx_ir` + `sympy`, put on the ORT children's path as bench/ptq.py does.",
        "- `placement=all` rows quantize every conv like ORT does; the default `placement=speed` leaves thin "
        "depthwise and small 1x1 convs float (faster on ORT CPU, and fewer quantized layers).",
        "",
    ]
    for spec in specs:
        out += [f"### {spec.title}", "", spec.text[0].upper() + spec.text[1:] + ".", "", table(spec), ""]
    out += ["### Which algorithm when", "", reading(specs), ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer samples and rows")
    parser.add_argument(
        "--only",
        choices=["digits_cnn", "ppocr_cls", "ppocr_rec", "minilm_l3"],
        action="append",
        help="only these models (repeatable); the README is not written",
    )
    parser.add_argument("--no-readme", action="store_true", help="print only; leave bench/README.md alone")
    args = parser.parse_args()
    start = time.perf_counter()
    load_start = common.load_average()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    peer_env = ptq._peer_env()
    work = Path(tempfile.mkdtemp(prefix="onnxcomp-bench-algorithms-"))
    try:
        specs = [s for s in build_models(work, args.quick) if not args.only or s.key in args.only]
        for spec in specs:
            log(spec.key)
            run(spec, plan(spec, work, args.quick), peer_env, log)
        body = render(specs, args, time.perf_counter() - start, (load_start, common.load_average()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{SECTION}\n\n{body}")
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
