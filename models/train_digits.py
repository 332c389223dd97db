"""Train the onnxcomp demo model: a small BatchNorm CNN on scikit-learn's digits.

Produces three artifacts next to this file:

* ``digits_cnn.onnx``     -- the trained CNN, opset 17, input ``input`` [N,1,16,16]
                             float32, output ``logits`` [N,10] float32, with
                             BatchNormalization and Dropout kept as separate
                             inference-mode nodes (the fusion passes' test bed).
* ``digits_heldout.npz``  -- stratified 30 % hold-out test set: ``input`` float32
                             [540,1,16,16] (already normalised), ``label`` int64 [540].
* ``digits_calib.npz``    -- 128 samples from the *training* part, one array named
                             like the model input: ``input`` float32 [128,1,16,16].

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, values 0..16, bundled with
scikit-learn, BSD-3-Clause; no download). Preprocessing, done outside the network:
pixels / 16 -> [0,1]; fixed bilinear 2x upsampling 8x8 -> 16x16 (half-pixel centres,
edge clamped, == ``F.interpolate(..., mode="bilinear", align_corners=False)``);
then ``(x - MEAN) / STD`` with the fixed constants below.

The graph is written with ``onnx.helper`` from the trained weights rather than with
``torch.onnx.export``: the TorchScript exporter folds BN into Conv in eval mode, and
even with ``do_constant_folding=False`` it drops Dropout, adds stray Identity nodes
and names nodes ``/0/Conv``. Writing it by hand gives stable node names
(``conv1``, ``bn1``, ..., ``fc1``, ``bn_fc1``, ``dropout``, ``fc2``) and
byte-identical output across runs.

Deterministic: fixed seeds, ``torch.use_deterministic_algorithms(True)``, one
thread; re-running reproduces the same weights, accuracy and bytes (the .npz files
are written with fixed zip timestamps). Takes well under a minute on 2 CPU cores.

Re-run (torch must NOT go into the project's .venv; use a separate venv)::

    python3 -m venv .venv-train
    .venv-train/bin/pip install torch==2.13.0 scikit-learn numpy onnx==1.23.2 onnxruntime==1.32.0
    .venv-train/bin/python models/train_digits.py

Options: ``--out-dir DIR`` (default: this file's folder), ``--epochs N`` (default 40).
"""

from __future__ import annotations

import argparse
import io
import os
import time
import zipfile
from pathlib import Path

# Single thread everywhere, set before torch/numpy spin up their pools.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

SEED = 0
# Mean / std of the [0,1]-scaled, 16x16-upsampled training split (rounded, fixed).
MEAN = 0.3056
STD = 0.3190
TEST_FRACTION = 0.3
N_CALIB = 128
BN_EPS = 1e-5
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; widely loadable


# --------------------------------------------------------------------------- data
def upsample2x_bilinear(x: np.ndarray) -> np.ndarray:
    """[N,H,W] -> [N,2H,2W], bilinear, half-pixel centres, edges clamped."""
    n, h, w = x.shape

    def coords(size_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(2 * size_in) + 0.5) / 2.0 - 0.5
        src = np.clip(src, 0.0, None)
        lo = np.floor(src).astype(np.int64)
        lo = np.minimum(lo, size_in - 1)
        hi = np.minimum(lo + 1, size_in - 1)
        frac = (src - lo).astype(np.float32)
        return lo, hi, frac

    ylo, yhi, fy = coords(h)
    xlo, xhi, fx = coords(w)
    rows = x[:, ylo, :] * (1 - fy)[None, :, None] + x[:, yhi, :] * fy[None, :, None]
    out = rows[:, :, xlo] * (1 - fx)[None, None, :] + rows[:, :, xhi] * fx[None, None, :]
    return out.astype(np.float32)


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """Returns images in [0,1], float32 [1797,1,16,16], and labels int64 [1797]."""
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    up = upsample2x_bilinear(x)
    ref = F.interpolate(torch.from_numpy(x)[:, None], scale_factor=2, mode="bilinear", align_corners=False).numpy()[
        :, 0
    ]
    assert np.abs(up - ref).max() < 1e-6, "numpy upsampling disagrees with torch"
    return up[:, None], d.target.astype(np.int64)


def normalise(x01: np.ndarray | torch.Tensor):
    return (x01 - MEAN) / STD


def random_shift(x01: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by an independent random (dy, dx) in {-1,0,1}^2, zero fill."""
    n, _, h, w = x01.shape
    padded = F.pad(x01, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(h)[None, :]  # [n,h]
    cols = dx[:, None] + torch.arange(w)[None, :]  # [n,w]
    b = torch.arange(n)[:, None, None]
    return padded[b, 0, rows[:, :, None], cols[:, None, :]][:, None]


# -------------------------------------------------------------------------- model
class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, eps=BN_EPS)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32, eps=BN_EPS)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64, eps=BN_EPS)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(64, eps=BN_EPS)
        self.fc1 = nn.Linear(64 * 4 * 4, 64)
        self.bn_fc1 = nn.BatchNorm1d(64, eps=BN_EPS)
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # 16x16x16
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 32x8x8
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # 64x4x4
        x = F.relu(self.bn4(self.conv4(x)))  # 64x4x4
        x = torch.flatten(x, 1)  # 1024
        x = F.relu(self.bn_fc1(self.fc1(x)))  # 64
        return self.fc2(self.dropout(x))  # 10


def train(model: DigitsCNN, x01: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch = 64
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            if len(idx) < 2:  # BatchNorm needs > 1 sample per batch
                continue
            xb = normalise(random_shift(x01[idx], gen))
            yb = y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            total += len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"  epoch {epoch + 1:3d}: loss {loss_sum / total:.4f}  train acc (augmented) {correct / total:.4f}")


# --------------------------------------------------------------------------- onnx
def build_onnx(model: DigitsCNN) -> onnx.ModelProto:
    """Write the eval-mode graph by hand: Conv / BatchNormalization / Relu / MaxPool /
    Flatten / Gemm / Dropout, all weights as initializers, stable names."""
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def conv(name: str, x: str) -> str:
        w = init(f"{name}.weight", sd[f"{name}.weight"])
        nodes.append(
            helper.make_node(
                "Conv",
                [x, w],
                [f"{name}_out"],
                name=name,
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[1, 1],
                dilations=[1, 1],
                group=1,
            )
        )
        return f"{name}_out"

    def bn(name: str, x: str) -> str:
        ins = [x] + [init(f"{name}.{p}", sd[f"{name}.{p}"]) for p in ("weight", "bias", "running_mean", "running_var")]
        nodes.append(
            helper.make_node("BatchNormalization", ins, [f"{name}_out"], name=name, epsilon=BN_EPS, momentum=0.9)
        )
        return f"{name}_out"

    def op(op_type: str, name: str, x: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, [x], [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def gemm(name: str, x: str, out: str | None = None) -> str:
        out = out or f"{name}_out"
        w = init(f"{name}.weight", sd[f"{name}.weight"])  # [out, in] -> transB=1
        b = init(f"{name}.bias", sd[f"{name}.bias"])
        nodes.append(helper.make_node("Gemm", [x, w, b], [out], name=name, alpha=1.0, beta=1.0, transA=0, transB=1))
        return out

    pool = dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
    x = "input"
    x = op("Relu", "relu1", bn("bn1", conv("conv1", x)))
    x = op("Relu", "relu2", bn("bn2", conv("conv2", x)))
    x = op("MaxPool", "pool2", x, **pool)
    x = op("Relu", "relu3", bn("bn3", conv("conv3", x)))
    x = op("MaxPool", "pool3", x, **pool)
    x = op("Relu", "relu4", bn("bn4", conv("conv4", x)))
    x = op("Flatten", "flatten", x, axis=1)
    x = op("Relu", "relu_fc1", bn("bn_fc1", gemm("fc1", x)))
    x = op("Dropout", "dropout", x)  # inference mode: no ratio / training_mode inputs
    gemm("fc2", x, out="logits")

    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 16, 16])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxcomp-models-train_digits",
        producer_version="1",
        doc_string="Small BN CNN on sklearn digits (8x8 upsampled to 16x16). See models/README.md.",
    )
    m.ir_version = IR_VERSION
    helper.set_model_props(
        m,
        {
            "preprocessing": f"x = upsample2x_bilinear(pixels / 16); x = (x - {MEAN}) / {STD}",
            "classes": "0,1,2,3,4,5,6,7,8,9",
            "dataset": "sklearn.datasets.load_digits (BSD-3-Clause)",
        },
    )
    onnx.checker.check_model(m, full_check=True)
    return m


# ----------------------------------------------------------------------------- io
def savez_deterministic(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps (byte-reproducible)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    x01, y = load_data()
    idx = np.arange(len(y))
    tr_idx, te_idx = train_test_split(idx, test_size=TEST_FRACTION, stratify=y, random_state=SEED)
    tr_idx, te_idx = np.sort(tr_idx), np.sort(te_idx)
    calib_idx, _ = train_test_split(tr_idx, train_size=N_CALIB, stratify=y[tr_idx], random_state=SEED)
    calib_idx = np.sort(calib_idx)
    assert not set(calib_idx) & set(te_idx)
    print(f"data: {len(tr_idx)} train / {len(te_idx)} held-out / {len(calib_idx)} calib (calib drawn from train)")

    x_test = normalise(x01[te_idx]).astype(np.float32)
    y_test = y[te_idx].astype(np.int64)
    x_calib = normalise(x01[calib_idx]).astype(np.float32)

    model = DigitsCNN()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters ({n_params * 4 / 1024:.1f} KiB float32)")
    t0 = time.perf_counter()
    train(model, torch.from_numpy(x01[tr_idx]), torch.from_numpy(y[tr_idx]), args.epochs)
    train_s = time.perf_counter() - t0
    print(f"training time: {train_s:.1f} s")

    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())

    onnx_model = build_onnx(model)
    onnx_path = args.out_dir / "digits_cnn.onnx"
    onnx_path.write_bytes(onnx_model.SerializeToString())
    savez_deterministic(args.out_dir / "digits_heldout.npz", input=x_test, label=y_test)
    savez_deterministic(args.out_dir / "digits_calib.npz", input=x_calib)

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    (ort_logits,) = sess.run(["logits"], {"input": x_test})
    diff = float(np.abs(ort_logits - torch_logits).max())
    ort_acc = float((ort_logits.argmax(1) == y_test).mean())
    assert diff < 1e-4, f"onnxruntime vs torch max abs diff {diff:.3g} >= 1e-4"

    ops: dict[str, int] = {}
    for n in onnx_model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print(f"onnx ops: {ops}")
    print(f"onnx nodes: {[n.name for n in onnx_model.graph.node]}")
    for name in ("digits_cnn.onnx", "digits_heldout.npz", "digits_calib.npz"):
        print(f"  {name}: {(args.out_dir / name).stat().st_size} bytes")
    print(f"torch eval accuracy:       {torch_acc:.4f}")
    print(f"max |onnxruntime - torch|: {diff:.3g}")
    print(f"held-out accuracy (onnxruntime): {ort_acc:.4f} ({int(round(ort_acc * len(y_test)))}/{len(y_test)})")


if __name__ == "__main__":
    main()
