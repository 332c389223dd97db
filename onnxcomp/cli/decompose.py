"""``onnxcomp decompose``: low-rank tensor decomposition from the command line.

The flags build the options of the ``decompose_conv`` (and, with ``--ops matmul|all``,
``decompose_matmul``) passes, the same as a recipe; the deployment fusions run first unless
``--no-fuse``. The record (``OUT.decomposition_record.json``) replays with ``--replay``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from onnxcomp.api import decompose
from onnxcomp.cli.common import (
    DeprecatedFlag,
    add_run_options,
    command,
    print_run_report,
    run_kwargs,
)
from onnxcomp.decomposition.rank import parse_rank_rule
from onnxcomp.decomposition.record import ARTIFACT, format_record
from onnxcomp.errors import ConfigError


def _rank_rule(text: str) -> str:
    try:
        parse_rank_rule(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _decompose_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    add_run_options(p, calibration="calibration data (.npz by input name, or a directory): refit the second factors")
    p.add_argument(
        "--rank-rule",
        type=_rank_rule,
        default="auto",
        metavar="RULE",
        help="auto (EVBMF, clamped band), energy:E, ratio:R or rank:N (default auto)",
    )
    p.add_argument("--align", type=int, default=16, help="round ranks to a multiple of N (default 16; 1 = exact)")
    p.add_argument("--replay", type=Path, metavar="FILE", help="apply exactly the ranks of a decomposition record")
    p.add_argument(
        "--layers",
        choices=("conv", "matmul", "all"),
        default="conv",
        help="decompose Conv (default), Gemm/MatMul weights, or both",
    )
    p.add_argument("--ops", dest="layers", choices=("conv", "matmul", "all"), action=DeprecatedFlag, new="--layers")
    p.add_argument(
        "--min-channels", type=int, help="too-small rule: min(Cin, Cout) below this with a kernel < 7 (default 64)"
    )
    p.add_argument(
        "--min-kernel-channels", type=int, help="too-small rule: min(k) * min(Cin, Cout) below this (default 16)"
    )
    p.add_argument("--allow-dilation", action="store_true", help="also decompose dilated convolutions")
    p.add_argument("--no-refit", action="store_true", help="keep the SVD factors even with --calib")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB", help="leave nodes matching GLOB alone")


@command(
    "decompose", "low-rank tensor decomposition: kxk Conv -> kx1 + 1xk pair (and Gemm/MatMul W ~= A@B)", _decompose_args
)
def _decompose(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"skip": args.skip, "refit": not args.no_refit}
    if args.min_channels is not None:
        options["min_channels"] = args.min_channels
    if args.min_kernel_channels is not None:
        options["min_kernel_channels"] = args.min_kernel_channels
    if args.allow_dilation:
        options["allow_dilation"] = True
    report = decompose(
        args.model,
        args.output,
        layers=args.layers,
        rank_rule=args.rank_rule,
        align=args.align,
        replay=args.replay,
        options=options,
        **run_kwargs(args),
    )
    print_run_report(args, report, args.output)
    record = next((s.result.data["record"] for s in report.steps if "record" in s.result.data), None)
    if not args.quiet and record is not None and record["nodes"]:
        print(format_record(record))
        print(f"record: {args.output.with_name(args.output.name.removesuffix('.onnx') + f'.{ARTIFACT}.json')}")
    return 0
