"""``onnxcomp verify-ascend OUT.onnx --data DATA``: run an Ascend deploy model without an NPU (docs/ascend.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcomp.calibration.data import calibration_source
from onnxcomp.cli.common import command
from onnxcomp.quant.ascend.verify import verify_deploy


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the deploy model (OUT.onnx of quantize --target ascend)")
    p.add_argument(
        "--data", type=Path, required=True, help="inputs: .npz with one array per model input, or a directory"
    )
    p.add_argument("--samples", type=int, metavar="N", help="use at most N samples of the data")
    p.add_argument("--batch-size", type=int, default=16, help="samples per batch (default 16)")
    p.add_argument(
        "--atol", type=float, default=1e-4, help="largest |deploy - fake_quant| accepted per output (default 1e-4)"
    )


@command(
    "verify-ascend", "run an Ascend deploy model on the reference interpreter; compare and check its record", _args
)
def _verify(args: argparse.Namespace) -> int:
    model = onnx.load(str(args.model), load_external_data=False) if args.model.is_file() else None
    data: Any = args.data
    if model is not None and args.data.suffix == ".npz" and args.data.is_file():
        names = {i.name for i in model.graph.input}
        with np.load(args.data) as arrays:  # a 'label' array (compare's accuracy) is not an input: dropped
            data = [{k: arrays[k] for k in arrays.files if k in names}]
    batches = (
        calibration_source(data, model, batch_size=args.batch_size, max_samples=args.samples)[0]
        if model is not None
        else list
    )
    result = verify_deploy(args.model, batches)
    if not args.quiet:
        print("\n".join(result.lines(args.atol)))
    return 0 if result.ok(args.atol) else 1
