"""Peak RSS of calibration with the graph run in partitions (``--calib-partitions N``) against one session.

Run from the repo root::

    .venv/bin/python bench/scale_partitions.py              # ~3 min on 2 cores
    .venv/bin/python bench/scale_partitions.py --no-readme  # print only

Model and data as ``bench/scale.py`` (an LLM-shaped decoder from ``models/decoder.py``, 4 layers,
hidden 512, ffn 1408, vocab 8000; 32 sequences of 256 tokens), here in one batch of 32 so the
activations of a batch, not the model, dominate the process. Calibrated tensors: the activation
input of every MatMul with a constant weight, histogram observers. Each configuration runs in a
fresh child process, the configurations interleaved over ``--rounds`` rounds; the table gives the
median of the child's peak RSS (VmHWM) and of the ``Calibrator.run`` seconds, and whether the
statistics are bit-identical to the one-session run's.

The result replaces the "### Partitioned calibration" subsection of bench/README.md (inside the
"## Scale: sharded and memory-bounded calibration" section; run this after ``bench/scale.py``,
which rewrites that whole section).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for entry in (str(REPO), str(REPO / "bench")):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from _common import child_main, environment_line, markdown_table, run_child, write_readme_section  # noqa: E402
from scale import SEQ_LEN, SEQUENCES, SHAPE, _calibrate  # noqa: E402 - bench/scale.py: model, data, child

from models.decoder import write_decoder  # noqa: E402

BATCH = 32  # one batch: its activations, not the model, dominate the process
HEADING = "### Partitioned calibration: peak RSS (`--calib-partitions`)"
PARTITIONS = (1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # the machine may be shared: the seconds are noisy, peak RSS is not
    rss: dict[int, list[float]] = {p: [] for p in PARTITIONS}
    seconds: dict[int, list[float]] = {p: [] for p in PARTITIONS}
    digests: dict[int, set[str]] = {p: set() for p in PARTITIONS}
    tensors = 0
    with tempfile.TemporaryDirectory(prefix="bench-partitions-") as tmp:
        model = Path(tmp, "decoder.onnx")
        write_decoder(model, SHAPE, seed=0)
        data = Path(tmp, "calib.npz")
        np.savez(data, input_ids=np.random.default_rng(0).integers(0, SHAPE.vocab, (SEQUENCES, SEQ_LEN)))
        for round_index in range(args.rounds):
            for parts in PARTITIONS:
                task = {
                    "kind": "calibrate",
                    "model": str(model),
                    "data": str(data),
                    "batch": BATCH,
                    "partitions": parts,
                }
                child = run_child(__file__, task)
                if not child.ok:
                    raise SystemExit(f"partitions={parts}: the child failed: {child.error}")
                rss[parts].append(child.peak_rss_mb)
                seconds[parts].append(child.result["seconds"])
                digests[parts].add(child.result["digest"])
                tensors = child.result["tensors"]
                print(round_index, parts, f"{child.peak_rss_mb:.0f} MiB", child.result["notes"], flush=True)
    reference = digests[1]
    base_rss = statistics.median(rss[1])
    rows = [
        [
            "1 session (all at once)" if parts == 1 else f"{parts} partitions",
            f"{statistics.median(rss[parts]):.0f}",
            f"{statistics.median(rss[parts]) / base_rss:.2f}x",
            f"{statistics.median(seconds[parts]):.2f}",
            "yes" if digests[parts] == reference and len(reference) == 1 else "NO",
        ]
        for parts in PARTITIONS
    ]
    weights_mb = SHAPE.parameters() * 4 / 2**20
    body = "\n\n".join(
        [
            f"`python bench/scale_partitions.py`: calibration of the {tensors} MatMul activation inputs of the decoder "
            f"above ({weights_mb:.0f} MiB of weights) with histogram observers, {SEQUENCES} sequences of {SEQ_LEN} "
            f"tokens in one batch of {BATCH}, the graph in one session or cut into N partitions "
            f"(`CalibrationResources(partitions=N)`, `--calib-partitions N`). Each configuration in a fresh process, "
            f"interleaved over {args.rounds} rounds; medians of the process's peak RSS (VmHWM) and of the "
            "`Calibrator.run` seconds. 'same' = the statistics are bit-identical to the one-session run's.",
            markdown_table(["configuration", "peak RSS MiB", "vs 1 session", "seconds", "same"], rows, "lrrrl"),
            "A partition's session holds only its own intermediates and the boundary tensors still to be read, "
            "so the saving is the activations of the rest of the graph; the model's weights, the feeds and the "
            "observers stay. Each partition is a separate onnxruntime session (their start-up and per-run "
            "overhead is in the seconds). Two things make the saving real: each partition's session runs "
            "without an onnxruntime arena (N arenas each keep their peak: 1.51x and 2.38x of the one-session peak "
            "for 4 and 16 partitions, measured before they were turned off), and glibc is asked to give the "
            "freed buffers back after each partition (`malloc_trim`; without it 16 partitions peaked at 1.10x).",
            f"Load average at the start: {load:.1f} (`os.getloadavg`).",
            environment_line(["onnxruntime", "numpy"]),
        ]
    )
    print(body)
    if not args.no_readme:
        write_readme_section(REPO / "bench" / "README.md", HEADING, body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main({"calibrate": _calibrate})
    else:
        main()
