"""``onnxcomp distill``: quantization with rounding, scales and biases learned layer by layer.

Takes every ``quantize`` format flag and writes what ``quantize`` writes (model, optional
simulation model, record, report); the learning flags are below (docs/distill.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxcomp.api import distill
from onnxcomp.cli.common import add_run_options, command, print_run_report, run_kwargs
from onnxcomp.cli.quantize import add_quantize_flags, add_target_flags, quantize_flag_kwargs
from onnxcomp.quant.report import format_report


def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    add_run_options(p, calibration="unlabelled calibration data: .npz named by model input, or a directory")
    add_quantize_flags(p)
    p.add_argument("--simulation", type=Path, help="also write the simulation (fake-quant) model to this path")
    add_target_flags(p)
    learn = p.add_argument_group("distillation (docs/distill.md)")
    learn.add_argument("--iters", type=int, metavar="N", help="Adam steps per block (default 300)")
    learn.add_argument("--lr", type=float, help="step of the rounding variables (default 0.1)")
    learn.add_argument("--batch-rows", type=int, metavar="N", help="output rows (positions) per step (default 1024)")
    learn.add_argument(
        "--round-weight", type=float, metavar="W", help="weight of the rounding regularizer (default 1.0)"
    )
    learn.add_argument("--no-learn-rounding", action="store_true", help="keep round-to-nearest codes")
    learn.add_argument("--no-learn-scales", action="store_true", help="keep the observer's weight scales")
    learn.add_argument("--no-learn-bias", action="store_true", help="keep the float biases")
    learn.add_argument(
        "--learn-ranges",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="learn each block input's activation clipping range (static activations; default off)",
    )
    learn.add_argument(
        "--balance-channels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="weight each output channel's error by 1 / its teacher energy (default on)",
    )
    learn.add_argument(
        "--teacher-input",
        action="store_true",
        help="feed each block the float model's input (default: the already-distilled student's)",
    )


def _optional_learning(args: argparse.Namespace) -> dict[str, bool]:
    """The learning switches given on the command line (unset ones keep the pass defaults)."""
    given = {"learn_ranges": args.learn_ranges, "balance_channels": args.balance_channels}
    return {k: v for k, v in given.items() if v is not None}


@command("distill", "quantization with rounding, scales and biases learned layer by layer (no labels)", _distill_args)
def _distill(args: argparse.Namespace) -> int:
    report = distill(
        args.model,
        args.output,
        simulation_output=args.simulation,
        iters=args.iters,
        lr=args.lr,
        batch_rows=args.batch_rows,
        round_weight=args.round_weight,
        learn_rounding=False if args.no_learn_rounding else None,
        learn_scales=False if args.no_learn_scales else None,
        learn_bias=False if args.no_learn_bias else None,
        teacher_input=args.teacher_input or None,
        target=args.target,
        ascend_int4=args.ascend_int4 or None,
        **_optional_learning(args),
        **quantize_flag_kwargs(args),
        **run_kwargs(args),
    )
    print_run_report(args, report, args.output)
    step = report.result("distill")
    if not args.quiet and "report" in step.data:
        print(format_report(step.data["report"]))
    if not args.quiet:
        entries = [e["distill"] for e in step.data.get("record", []) if "distill" in e]
        learned = [d for d in entries if d["kept"] == "distilled"]
        print(f"distilled {len(learned)} of {len(entries)} blocks (the record has each block's error before/after)")
    return 0
