"""``onnxcomp sparsify --pattern 2:4`` (SparseGPT, dense target: the default) in one process vs ``--workers 2``.

Run from the repo root::

    .venv/bin/python bench/scale_sparsify.py                 # the digits demo, 3 rounds
    .venv/bin/python bench/scale_sparsify.py --model ppocr_cls --rounds 3

Each run is the CLI in a fresh process, the two configurations interleaved over ``--rounds``
rounds; printed: the median wall seconds of each, the ratio, whether the outputs are
byte-identical and the load average at the start. The figures go by hand into bench/README.md
("### SparseGPT dense target sharded").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for entry in (str(REPO), str(REPO / "bench")):
    if entry not in sys.path:
        sys.path.insert(0, entry)


def inputs(model: str, tmp: Path) -> tuple[Path, Path]:
    """The model file and its calibration .npz (the digits demo's, or 64 ppocr_cls lines)."""
    if model == "digits":
        return REPO / "models" / "digits_cnn.onnx", REPO / "models" / "digits_calib.npz"
    from tests.real_models import make_inputs, real_model

    calib = tmp / "calib.npz"
    np.savez(calib, **make_inputs(model, 64, seed=1))
    return Path(real_model(model)), calib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", help="digits (the demo) or ppocr_cls")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cli = str(Path(sys.executable).with_name("onnxcomp"))
    load = os.getloadavg()[0]
    times: dict[str, list[float]] = {"1 process": [], "2 workers": []}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model, calib = inputs(args.model, tmp)
        for round_ in range(args.rounds):
            for config, extra in (("1 process", []), ("2 workers", ["--workers", "2"])):
                out = tmp / f"{config.replace(' ', '_')}_{round_}.onnx"
                command = [cli, "sparsify", str(model), "-o", str(out), "--pattern", "2:4", "--calib", str(calib)]
                start = time.perf_counter()
                subprocess.run([*command, *extra], check=True, capture_output=True)
                times[config].append(time.perf_counter() - start)
        same = (tmp / "1_process_0.onnx").read_bytes() == (tmp / "2_workers_0.onnx").read_bytes()
    one, two = (statistics.median(times[c]) for c in times)
    print(f"model {args.model}, medians of {args.rounds} interleaved rounds, load {load:.1f} at the start")
    print(f"1 process {one:.2f} s, 2 workers {two:.2f} s ({one / two:.2f}x), outputs byte-identical: {same}")
    print({config: [round(t, 2) for t in ts] for config, ts in times.items()})


if __name__ == "__main__":
    main()
