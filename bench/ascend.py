"""--target ascend: accuracy of each quantizer option on the Ascend grid, and ppocr_det's deploy vs fake-quant.

For the demo CNN (``models/digits_cnn.onnx``, calibration ``digits_calib.npz``, 540 held-out
digits) it runs ``--target ascend`` plain (round to nearest), with GPTQ, bias correction (full,
fast), the ``distill`` pass, INT4 weights plain and distilled, and an accuracy target from INT4;
for each: held-out top-1 of the fake-quant model (onnxruntime), the mean squared logit error
against the float model, and whether the deploy model on the reference interpreter equals the
fake-quant model bit for bit. Then ppocr_det at 1x3x160x160: the layers declined for int32 bias
overflow, the largest int32 bias, how many layers have identical accumulators in both models,
and the largest output difference. No timing: the figures do not depend on the machine.

Run from the repo root::

    .venv/bin/python bench/ascend.py        # about 3 minutes on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnxcomp  # noqa: E402
from models.fetch import fetch, make_inputs  # noqa: E402
from onnxcomp.quant.ascend.reference import deploy_session  # noqa: E402

MODELS = REPO / "models"
DEMO, CALIB, HELDOUT = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz", MODELS / "digits_heldout.npz"
INT4 = {"weights": "int4", "ascend_int4": True}
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("round to nearest", "quantize", {}),
    ("--weight-algorithm gptq", "quantize", {"weight_algorithm": "gptq"}),
    ("--bias-correction full", "quantize", {"bias_correction": "full"}),
    ("--bias-correction fast", "quantize", {"bias_correction": "fast"}),
    ("distill (100 iters)", "distill", {"iters": 100}),
    ("INT4 weights, round to nearest", "quantize", INT4),
    ("INT4 weights, distill (100 iters)", "distill", {**INT4, "iters": 100}),
    ("INT4 weights, --accuracy-target cos:0.9996", "quantize", {**INT4, "accuracy_target": "cos:0.9996"}),
]


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def demo(folder: Path) -> list[str]:
    held = np.load(HELDOUT)
    x, labels = held["input"], held["label"]
    reference = _session(DEMO).run(None, {"input": x})[0].astype(np.float64)
    rows = [
        "| option | layers | held-out top-1 | logit MSE vs fp32 | deploy == fake-quant |",
        "|---|---|---|---|---|",
        f"| float32 | - | {(reference.argmax(1) == labels).mean():.4f} | 0 | - |",
    ]
    for i, (label, front, options) in enumerate(VARIANTS):
        out = folder / f"v{i}.onnx"
        run = getattr(onnxcomp, front)
        report = run(DEMO, out, calibration=CALIB, target="ascend", reports=False, **options)
        layers = report.steps[-1].result.stats.get("nodes", 0)
        fake = _session(folder / f"v{i}.fake_quant.onnx").run(None, {"input": x})[0]
        equal = np.array_equal(deploy_session(str(out)).run(None, {"input": x})[0], fake)
        mse = float(((fake - reference) ** 2).mean())
        rows.append(f"| {label} | {layers} | {(fake.argmax(1) == labels).mean():.4f} | {mse:.3g} | {equal} |")
    return rows


def det(folder: Path) -> list[str]:
    out = folder / "det.onnx"
    calib = make_inputs("ppocr_det", 4, 0, height=160, width=160)
    report = onnxcomp.quantize(fetch("ppocr_det"), out, calibration=[calib], target="ascend", reports=False)
    step = report.steps[-1].result
    overflow = sorted(name for name, why in step.declined if why.startswith("int32 bias overflow"))
    model = onnx.load(out)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    biggest = max(
        int(np.abs(inits[n.input[2]]).max())
        for n in model.graph.node
        if len(n.input) > 2 and n.input[2] in inits and inits[n.input[2]].dtype == np.int32
    )
    layers = [n.name[: -len(".dequant")] for n in model.graph.node if n.op_type == "AscendDequant"]
    fake_model = onnx.load(folder / "det.fake_quant.onnx")
    fake_model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(f"{name}.int_out") for name in layers)
    onnx.save(fake_model, folder / "probe.onnx")
    feeds = make_inputs("ppocr_det", 1, 1, height=160, width=160)
    session = _session(folder / "probe.onnx")
    fake = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    deploy = deploy_session(str(out)).run(None, feeds, intermediate=True)
    exact = sum(np.array_equal(deploy[f"{n}.int_out"], fake[f"{n}.int_out"].astype(np.int32)) for n in layers)
    worst = max(float(np.abs(deploy[f"{n}.int_out"] - fake[f"{n}.int_out"].astype(np.float64)).max()) for n in layers)
    y = model.graph.output[0].name
    return [
        f"- quantized layers: {len(layers)}; declined for int32 bias overflow: {', '.join(overflow)}",
        f"- largest int32 bias: {biggest:.3g} (float32 holds integers exactly only to 2^24 = 1.68e7)",
        f"- layers with identical int32 accumulators: {exact} of {len(layers)}; largest difference {worst:g}",
        f"- largest output difference (after the final Sigmoid): {float(np.abs(deploy[y] - fake[y]).max()):.3g}",
    ]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(demo(Path(tmp))))
        print()
        print("\n".join(det(Path(tmp))))


if __name__ == "__main__":
    main()
