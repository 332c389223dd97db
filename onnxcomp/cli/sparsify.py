"""``onnxcomp sparsify``: n:m structured sparsity or channel pruning, optionally then quantization.

The flags build the same passes as a recipe (``onnxcomp.sparsity.recipe.sparsify_passes``):
the deployment fusions (unless ``--no-fuse``), ``sparsify_2to4`` or ``prune_channels``, and with
``--quantize`` a ``quantize`` pass (the combined recipe).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxcomp.api import sparsify
from onnxcomp.cli.common import (
    DeprecatedFlag,
    add_run_options,
    command,
    print_run_report,
    run_kwargs,
)
from onnxcomp.cli.shapes import add_input_shape
from onnxcomp.errors import OnnxCompError
from onnxcomp.formats import available_formats
from onnxcomp.model_io import load_model
from onnxcomp.quant.spec import ACTIVATION_FORMATS
from onnxcomp.sparsity.report import (
    NM_ON_ORT,
    alignment_hint,
    compare_models,
    format_compare,
    format_layers,
    pattern_coverage,
)


def _layer_ratio(text: str) -> tuple[str, float]:
    glob, sep, value = text.rpartition("=")
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if not sep or not glob or not 0.0 <= ratio < 1.0:
        raise argparse.ArgumentTypeError(f"expected GLOB=RATIO with RATIO in [0, 1), got {text!r}")
    return glob, ratio


def _sparsify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    add_input_shape(p)
    add_run_options(
        p,
        calibration="calibration data (.npz named by model input, or a directory); "
        "enables SparseGPT for --pattern and the least-squares refit of the pruned layers' consumers",
    )
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--pattern", metavar="N:M", help="n:m structured sparsity along input channels, e.g. 2:4")
    kind.add_argument("--ratio", type=float, metavar="R", help="fraction of output channels to remove, e.g. 0.3")
    kind.add_argument("--prune-ratio", dest="ratio", type=float, action=DeprecatedFlag, new="--ratio")
    p.add_argument(
        "--method",
        choices=("magnitude", "sparsegpt"),
        help="how --pattern picks the kept weights: sparsegpt (second-order, updates the kept weights; "
        "needs --calib, the default with it) or magnitude (the default without --calib)",
    )
    p.add_argument(
        "--dense-layers",
        type=int,
        metavar="N",
        help="sparsegpt: leave the N layers whose sparse output error is largest dense (listed as declined)",
    )
    p.add_argument(
        "--global",
        dest="scope_global",
        action="store_true",
        help="spread --ratio over the whole model instead of every layer",
    )
    p.add_argument(
        "--layer-ratio",
        action="append",
        default=[],
        type=_layer_ratio,
        metavar="GLOB=RATIO",
        help="prune layers matching GLOB by RATIO instead",
    )
    p.add_argument(
        "--round-to",
        type=int,
        default=1,
        metavar="K",
        help="round kept channels up to a multiple of K (16 keeps onnxruntime's NCHWc conv layout)",
    )
    p.add_argument(
        "--criterion",
        choices=("l1", "l2", "data"),
        default="l2",
        help="channel importance: weight norm (l1, l2) or output error on calibration data (data)",
    )
    p.add_argument("--no-refit", action="store_true", help="do not refit the consumers (even with --calib)")
    p.add_argument("--no-reconstruct", dest="no_refit", action=DeprecatedFlag, nargs=0, const=True, new="--no-refit")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB", help="leave layers matching GLOB alone")
    p.add_argument(
        "--quantize",
        metavar="FORMAT",
        type=str.lower,
        choices=available_formats(),
        help=f"then quantize weights ({', '.join(available_formats())}): the combined recipe",
    )
    p.add_argument(
        "--activations",
        metavar="FORMAT",
        type=str.lower,
        choices=(*ACTIVATION_FORMATS, "none"),
        help=f"activation format for --quantize ({', '.join(ACTIVATION_FORMATS)}; default: none, weight-only)",
    )


@command("sparsify", "2:4 structured sparsity or channel pruning with refit (then optionally quantize)", _sparsify_args)
def _sparsify(args: argparse.Namespace) -> int:
    if args.ratio is not None and not 0.0 < args.ratio < 1.0:
        raise OnnxCompError(f"--ratio must be in (0, 1), got {args.ratio}")
    report = sparsify(
        args.model,
        args.output,
        pattern=args.pattern,
        ratio=args.ratio,
        scope="global" if args.scope_global else "layer",
        ratios=dict(args.layer_ratio),
        round_to=args.round_to,
        criterion=args.criterion,
        refit=False if args.no_refit else None,
        skip=args.skip,
        quantize=args.quantize,
        activations=args.activations,
        method=args.method,
        dense_layers=args.dense_layers,
        **run_kwargs(args),
    )
    print_run_report(args, report, args.output)
    if args.quiet:
        return 0
    name = "sparsify_2to4" if args.pattern else "prune_channels"
    result = report.result(name)
    for row in format_layers(name, result):
        print(f"  {row}")
    coverage = pattern_coverage(result) if args.pattern else None
    if coverage is not None:
        print(f"{args.pattern} pattern holds on {coverage:.2%} of the groups of the sparsified layers")
        print(NM_ON_ORT)
    hint = alignment_hint(result)
    if hint:
        print(hint)
    for row in format_compare(compare_models(load_model(args.model), report.model, dict(args.input_shape) or None)):
        print(row)
    return 0
