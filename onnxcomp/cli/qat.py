"""``onnxcomp qat``: quantization-aware training, or retraining after sparsity (needs the train extra).

The quantization flags mean what they mean for ``onnxcomp quantize``; ``--pattern`` / ``--ratio``
sparsify first as ``onnxcomp sparsify`` does. Without a weight format the pruned float model is
retrained; with one, the combined sparse + quantized model (docs/qat.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from onnxcomp.cli.common import command
from onnxcomp.errors import OnnxCompError
from onnxcomp.formats import available_formats
from onnxcomp.qat import train
from onnxcomp.quant.spec import ACTIVATION_FORMATS


def _qat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path, help="output .onnx path (the best epoch's export)")
    p.add_argument(
        "--data", required=True, type=Path, help="training data: .npz or a directory of .npz, named by input"
    )
    p.add_argument(
        "--labels", metavar="NAME", help="array of --data holding labels (default: distillation, label-free)"
    )
    p.add_argument("--epochs", type=int, default=1, help="passes over the training data (0: export the start)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (weights and scales)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the batch order and torch")
    p.add_argument(
        "--calib", type=Path, help="calibration data for the initial PTQ scales (default: the training data)"
    )
    p.add_argument("--weights", choices=available_formats(), help="weight format (none: retrain in float)")
    p.add_argument("--activations", choices=[*ACTIVATION_FORMATS, "none"], help="static activation format")
    p.add_argument("--granularity", help="weight granularity: tensor, channel, group:N")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB", help="leave nodes matching GLOB in float")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--pattern", metavar="N:M", help="n:m sparsity first (e.g. 2:4), masks fixed in training")
    kind.add_argument("--ratio", "--prune-ratio", dest="ratio", type=float, metavar="R", help="channel pruning first")
    p.add_argument("--resume", action="store_true", help="continue from OUT.qat_checkpoint.pt")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")


@command("qat", "quantization-aware training / sparse retraining with torch (pip install 'onnxcomp[train]')", _qat_args)
def _qat(args: argparse.Namespace) -> int:
    if args.epochs < 0 or args.lr <= 0 or args.batch_size < 1:
        raise OnnxCompError("--epochs must be >= 0, --lr > 0 and --batch-size >= 1")
    flags: dict[str, Any] = {}
    if args.weights is not None:
        flags["weights"] = args.weights
        flags["activations"] = args.activations or "none"
    elif args.activations is not None:
        raise OnnxCompError("--activations needs --weights (a weight format) for quantization-aware training")
    if args.granularity is not None:
        flags["granularity"] = args.granularity
    if args.skip:
        flags["skip"] = args.skip
    report = train(
        args.model,
        args.output,
        args.data,
        labels=args.labels,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        pattern=args.pattern,
        ratio=args.ratio,
        calibration=args.calib,
        resume=args.resume,
        force=args.force,
        progress=not args.quiet,
        **flags,
    )
    if not args.quiet:
        kept = "the starting point (no epoch improved it)" if report.best_epoch == 0 else f"epoch {report.best_epoch}"
        print(f"wrote {args.output}: {kept}, held-out {report.metric} {report.best_metric:.4f}")
    return 0
