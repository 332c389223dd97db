"""`make demo`: compress the bundled digits CNN and print a before/after table.

Runs the same CLI a user would (``onnxcomp fuse``, then ``onnxcomp quantize`` to INT8 with
calibration data), then measures every model on the held-out digits: file size, op counts,
top-1 accuracy and onnxruntime CPU latency (median, 1 thread).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from onnxcomp.analysis.inspect import human_bytes
from onnxcomp.analysis.metrics import accuracy, latency_ms, predict
from onnxcomp.model_io import load_model
from onnxcomp.testing import op_counts

HERE = Path(__file__).resolve().parent
MODEL = HERE / "digits_cnn.onnx"
HELDOUT = HERE / "digits_heldout.npz"
CALIB = HERE / "digits_calib.npz"
OUT = HERE.parent / "out"


def onnxcomp(*args: str) -> None:
    cmd = [sys.executable, "-m", "onnxcomp", *args]
    print("$ onnxcomp " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def measure(path: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    model = load_model(path)
    ops = op_counts(model)
    return {
        "file size": human_bytes(path.stat().st_size),
        "nodes": str(sum(ops.values())),
        "BatchNormalization": str(ops.get("BatchNormalization", 0)),
        "ops": ", ".join(f"{k} {v}" for k, v in sorted(ops.items())),
        "held-out accuracy": f"{accuracy(predict(model, {'input': images}), labels):.2f}%",
        "latency (1 img, median)": f"{latency_ms(model, {'input': images[:1]}):.3f} ms",
        "latency (64 img, median)": f"{latency_ms(model, {'input': images[:64]}, runs=20):.3f} ms",
    }


def main() -> int:
    OUT.mkdir(exist_ok=True)
    fused = OUT / "digits_fused.onnx"
    int8 = OUT / "digits_int8.onnx"
    onnxcomp("fuse", str(MODEL), "-o", str(fused), "--force")
    onnxcomp("quantize", str(MODEL), "-o", str(int8), "--calib", str(CALIB), "--force")
    data = np.load(HELDOUT)
    images, labels = data["input"], data["label"]
    columns = {
        "fp32 (original)": measure(MODEL, images, labels),
        "fused": measure(fused, images, labels),
        "fused + INT8": measure(int8, images, labels),
    }
    rows = list(next(iter(columns.values())))
    width = max(len(r) for r in rows)
    names = list(columns)
    col_w = [max(len(n), *(len(columns[n][r]) for r in rows if r != "ops")) for n in names]
    print()
    print(f"{'':<{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, col_w, strict=True)))
    for r in rows:
        if r == "ops":
            continue
        print(f"{r:<{width}}  " + "  ".join(f"{columns[n][r]:>{w}}" for n, w in zip(names, col_w, strict=True)))
    for n in names:
        print(f"ops ({n}): {columns[n]['ops']}")
    print(f"\nheld-out set: {len(labels)} digits; outputs in {OUT}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
