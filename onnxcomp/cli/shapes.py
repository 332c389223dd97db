"""``--input-shape NAME=D1,D2,...``: static input shapes for the MAC figures of any command."""

from __future__ import annotations

import argparse

from onnxcomp.analysis.macs import parse_input_shape


def _parse(text: str) -> tuple[str, list[int]]:
    try:
        return parse_input_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_input_shape(p: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--input-shape`` flag (``args.input_shape``: list of (name, dims))."""
    p.add_argument(
        "--input-shape",
        type=_parse,
        action="append",
        default=[],
        metavar="NAME=D1,D2,...",
        help="shape of input NAME for the MAC counts (symbolic dims count as 1 otherwise; repeatable)",
    )
