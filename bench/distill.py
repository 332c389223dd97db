"""Layer-wise distillation (``onnxcomp distill``) against round-to-nearest and GPTQ, on the demo and real models.

Run from the repo root::

    .venv/bin/python bench/distill.py                 # every model and setting
    .venv/bin/python bench/distill.py --quick         # fewer samples and iterations
    .venv/bin/python bench/distill.py --only ppocr_cls --no-readme
    .venv/bin/python bench/distill.py --only ppocr_cls --setting W4A8 --seeds 0,1,2   # distill per run seed

Settings: W4A8 (INT4 per-channel weights, UINT8 per-tensor activations; CNNs), W4 g32 weight-only
(INT4 groups of 32), FP4_E2M1 and FP4_E1M2 g32 weight-only, MXFP4 weight-only, and HiF8 / MXFP8
weights + activations. Methods: ``rtn`` (``quantize``), ``gptq`` (``quantize
weight_algorithm=gptq``; not for MX/HiF8, whose storage GPTQ also handles but is not the point
here) and ``distill`` (``onnxcomp.distill`` with its defaults unless ``--iters``). Calibration and
evaluation inputs come from different seeds. Every quantization runs in a fresh subprocess
(``bench/_common.py``'s ``run_child``): time is the wall time of the API call inside it (reports
off), peak RSS the child's VmHWM. The metric is measured in this process with onnxruntime CPU.

The result replaces the "## Layer-wise distillation" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _common as common  # noqa: E402 - after the sys.path insert

from onnxcomp.analysis.metrics import cosine, predict  # noqa: E402

W4A8 = {"weights": "int4", "granularity": "channel", "activations": "uint8"}
W4G32 = {"weights": "int4", "granularity": "group:32", "activations": "none"}
FP4 = {"weights": "fp4_e2m1", "granularity": "group:32", "activations": "none"}
FP4_E1M2 = {"weights": "fp4_e1m2", "granularity": "group:32", "activations": "none"}
MXFP4 = {"weights": "mxfp4", "activations": "none"}
HIF8 = {"weights": "hif8", "activations": "hif8"}
MXFP8 = {"weights": "mxfp8", "activations": "mxfp8"}


@dataclass
class ModelSpec:
    key: str
    title: str
    path: str
    calib: str
    text: str
    metric: str
    evaluate: Callable[[str], float]
    settings: dict[str, dict[str, Any]]


def child_quantize(task: dict[str, Any]) -> dict[str, Any]:
    import onnxcomp.api as api

    data = dict(np.load(task["calib"]))
    kw = {**task["settings"], "calibration": data, "batch_size": 8, "reports": False, "force": True}
    kw["placement"] = "all"
    start = time.perf_counter()
    if task["method"] == "distill" and task.get("seed") is not None:  # the run's seed: a recipe
        from onnxcomp.flags import quantize_options, with_fusions
        from onnxcomp.framework.recipe import Recipe
        from onnxcomp.framework.registry import make_pass

        options = {**quantize_options(**task["settings"], placement="all", reports=False)}
        if task.get("iters"):
            options["iters"] = task["iters"]
        recipe = Recipe(with_fusions([make_pass("distill", options)]), seed=task["seed"], validate=api.LOCATE)
        report = api.compress(task["model"], recipe, task["out"], calibration=data, batch_size=8, force=True)
        record = report.result("distill").data["record"]
        blocks = [e["distill"] for e in record if "distill" in e]
        extra = {"distilled": sum(b["kept"] == "distilled" for b in blocks), "blocks": len(blocks)}
    elif task["method"] == "distill":
        if task.get("iters"):
            kw["iters"] = task["iters"]
        report = api.distill(task["model"], task["out"], **kw)
        record = report.result("distill").data["record"]
        blocks = [e["distill"] for e in record if "distill" in e]
        extra = {"distilled": sum(b["kept"] == "distilled" for b in blocks), "blocks": len(blocks)}
    else:
        if task["method"] == "gptq":
            kw["weight_algorithm"] = "gptq"
        api.quantize(task["model"], task["out"], **kw)
        extra = {}
    return {"time_s": time.perf_counter() - start, **extra}


def build_models(work: Path, quick: bool, cls_heldout: int = 256) -> list[ModelSpec]:
    from models.fetch import MODELS, ctc_decode, fetch, make_inputs, sentences, tokenize

    specs: list[ModelSpec] = []
    src = str(REPO / "models" / "digits_cnn.onnx")
    held = dict(np.load(REPO / "models" / "digits_heldout.npz"))
    np.savez(work / "calib_digits.npz", input=np.load(REPO / "models" / "digits_calib.npz")["input"][:64])

    def eval_digits(path: str) -> float:
        logits = predict(common.as_proto(path), {"input": held["input"]}, batch=540, threads=2)
        return float((logits.argmax(1) == held["label"]).mean() * 100)

    specs.append(
        ModelSpec(
            "digits_cnn",
            "Demo digits CNN",
            src,
            str(work / "calib_digits.npz"),
            "64 calibration images; top-1 on the 540 held-out images",
            "top-1 %",
            eval_digits,
            {"W4A8": W4A8, "W4 g32": {**W4G32, "granularity": "group:32"}, "FP4_E2M1 g32": FP4, "MXFP4": MXFP4},
        )
    )

    cls = str(fetch("ppocr_cls"))
    n, n_eval = (16, 64) if quick else (32, cls_heldout)
    np.savez(work / "calib_cls.npz", **make_inputs("ppocr_cls", n, seed=1))
    held_cls, meta_cls = make_inputs("ppocr_cls", n_eval, seed=2, return_meta=True)
    cls_out = MODELS["ppocr_cls"]["primary_output"]

    def eval_cls(path: str) -> float:
        p = predict(common.as_proto(path), held_cls, batch=64, output=cls_out, threads=2)
        return float((p.argmax(1) == meta_cls["labels"]).mean() * 100)

    specs.append(
        ModelSpec(
            "ppocr_cls",
            "`ppocr_cls` (MobileNetV3 text-direction classifier)",
            cls,
            str(work / "calib_cls.npz"),
            f"{n} calibration lines (seed 1); top-1 vs the 0/180 labels of {n_eval} held-out lines (seed 2)",
            "top-1 %",
            eval_cls,
            {"W4A8": W4A8, "FP4_E2M1 g32": FP4, "MXFP4": MXFP4, "HiF8 W+A": HIF8},
        )
    )

    rec = str(fetch("ppocr_rec"))
    n, n_eval = (8, 16) if quick else (16, 32)
    np.savez(work / "calib_rec.npz", **make_inputs("ppocr_rec", n, seed=1))
    held_rec, meta_rec = make_inputs("ppocr_rec", n_eval, seed=2, return_meta=True)
    rec_out = MODELS["ppocr_rec"]["primary_output"]

    def eval_rec(path: str) -> float:
        probs = predict(common.as_proto(path), held_rec, batch=16, output=rec_out, threads=2)
        return common.char_accuracy(ctc_decode(probs, rec), meta_rec["texts"])

    specs.append(
        ModelSpec(
            "ppocr_rec",
            "`ppocr_rec` (PP-OCRv6 small recognizer: conv backbone + 2 transformer blocks, CTC)",
            rec,
            str(work / "calib_rec.npz"),
            f"{n} calibration lines 48x320 (seed 1); character accuracy of the greedy CTC decode of {n_eval} "
            "held-out lines (seed 2)",
            "char acc %",
            eval_rec,
            {"W4A8": W4A8, "W4 g32": W4G32, "FP4_E2M1 g32": FP4},
        )
    )

    lm = str(fetch("minilm_l3"))
    n, n_eval = (16, 48) if quick else (32, 96)
    cal_texts = sentences(n, seed=0)
    np.savez(work / "calib_lm.npz", **tokenize(cal_texts))
    seen = set(cal_texts)
    held_lm = tokenize([s for s in sentences(n_eval + n, seed=1) if s not in seen][:n_eval])
    lm_out = MODELS["minilm_l3"]["primary_output"]
    ref_lm = predict(common.as_proto(lm), held_lm, batch=32, output=lm_out, threads=2)

    def eval_lm(path: str) -> float:
        out = predict(common.as_proto(path), held_lm, batch=32, output=lm_out, threads=2)
        return float(np.mean([cosine(a, b) for a, b in zip(ref_lm, out, strict=True)]))

    specs.append(
        ModelSpec(
            "minilm_l3",
            "`minilm_l3` (paraphrase-MiniLM-L3-v2 sentence encoder)",
            lm,
            str(work / "calib_lm.npz"),
            f"{n} calibration sentences (seed 0); mean cosine of the sentence embedding vs fp32 on {n_eval} "
            "held-out sentences (seed 1)",
            "mean cos",
            eval_lm,
            {"W4 g32": W4G32, "FP4_E2M1 g32": FP4, "FP4_E1M2 g32": FP4_E1M2, "MXFP4": MXFP4, "MXFP8 W+A": MXFP8},
        )
    )
    return specs


def run(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    specs = [s for s in build_models(work, args.quick, args.cls_heldout) if not args.only or s.key in args.only]
    sections = []
    for spec in specs:
        fp32 = spec.evaluate(spec.path)
        rows = [["fp32", "-", common.fmt(fp32, 4 if spec.metric == "mean cos" else 2), "-", "-", ""]]
        print(f"{spec.key}: fp32 {fp32:.4f}", flush=True)
        for label, settings in spec.settings.items():
            if args.setting and label not in args.setting:
                continue
            methods = (
                ["rtn", "gptq", "distill"] if settings["weights"].startswith(("int", "fp4")) else ["rtn", "distill"]
            )
            runs = [(m, None) for m in methods if m != "distill"]
            runs += [("distill", seed) for seed in args.seeds] if args.seeds else [("distill", None)]
            for method, seed in runs:
                out = str(work / f"{spec.key}_{label.replace(' ', '_')}_{method}.onnx")
                task = {"kind": "quantize", "model": spec.path, "calib": spec.calib, "settings": settings}
                task.update(method=method, out=out, iters=args.iters, seed=seed)
                if seed is not None:
                    method = f"distill, seed {seed}"
                res = common.run_child(__file__, task, timeout=3600)
                if not res.ok:
                    rows.append([label, method, "failed", "-", "-", res.error[:80]])
                    print(f"  {label} {method}: failed {res.error}", flush=True)
                    continue
                value = spec.evaluate(out)
                note = (
                    f"{res.result['distilled']}/{res.result['blocks']} blocks distilled"
                    if method.startswith("distill")
                    else ""
                )
                digits = 4 if spec.metric == "mean cos" else 2
                rows.append(
                    [
                        label,
                        method,
                        common.fmt(value, digits),
                        common.fmt(res.result["time_s"], 1),
                        common.fmt(res.peak_rss_mb, 0),
                        note,
                    ]
                )
                print(
                    f"  {label} {method}: {value:.4f} in {res.result['time_s']:.1f} s, {res.peak_rss_mb:.0f} MiB {note}",
                    flush=True,
                )
        table = common.markdown_table(["setting", "method", spec.metric, "time s", "peak RSS MiB", ""], rows, "llrrrl")
        sections.append(f"### {spec.title}\n\n{spec.text}.\n\n{table}\n")
    env = common.environment_line(["numpy", "onnxruntime", "onnx"])
    iters = f"--iters {args.iters}" if args.iters else "default settings (300 Adam steps per block, 1024 rows per step)"
    head = (
        f"`bench/distill.py{' --quick' if args.quick else ''}`: round-to-nearest (`quantize`), GPTQ "
        f"(`quantize --weight-algorithm gptq`) and layer-wise distillation (`distill`, {iters}); placement all. "
        f"{env}\n"
    )
    return head + "\n" + "\n".join(sections)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", action="append", default=[])
    p.add_argument("--iters", type=int, default=0)
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--cls-heldout", type=int, default=256, help="ppocr_cls held-out lines (seed 2)")
    p.add_argument("--setting", action="append", default=[], help="only these settings (e.g. W4A8)")
    p.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        help="distill once per run seed (comma-separated), e.g. 0,1,2",
    )
    args = p.parse_args()
    body = run(args)
    print(body)
    partial = args.only or args.setting or args.seeds or args.cls_heldout != 256
    if not args.no_readme and not partial:
        common.write_readme_section(REPO / "bench" / "README.md", "## Layer-wise distillation", body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        common.child_main({"quantize": child_quantize})
    else:
        main()
