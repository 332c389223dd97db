"""Calibration of GPTQ's Gram statistics sharded over worker processes, against one process.

Run from the repo root::

    .venv/bin/python bench/scale_stats.py              # ~3 min on 2 cores
    .venv/bin/python bench/scale_stats.py --no-readme  # print only

Model and data as ``bench/scale.py`` (an LLM-shaped decoder from ``models/decoder.py``, 4 layers,
hidden 512, ffn 1408, vocab 8000; 32 sequences of 256 tokens in batches of 4). Collected: what
``quantize --weight-algorithm gptq`` collects, an ``InputGram`` (``X^T X``, float64) of every
MatMul with a constant weight, fanned out from each input tensor to the layers reading it
(``Fanout``), at most 4096 design rows per batch (the default ``gram_rows``). Each configuration
runs in a fresh child process, the configurations interleaved over ``--rounds`` rounds; the table
gives the median of the ``Calibrator.run`` seconds measured in the child, the child's peak RSS
(VmHWM; workers not included) and the largest relative difference of any Hessian entry from the
one-process run's (the sums differ only in the order of the float64 additions).

The result replaces the "### GPTQ Gram statistics sharded" subsection of bench/README.md (inside
the "## Scale: sharded and memory-bounded calibration" section; run this after ``bench/scale.py``,
which rewrites that whole section).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for entry in (str(REPO), str(REPO / "bench")):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from _common import child_main, environment_line, markdown_table, run_child, write_readme_section  # noqa: E402
from scale import BATCH, SEQ_LEN, SEQUENCES, SHAPE  # noqa: E402 - bench/scale.py: the model and data

from models.decoder import write_decoder  # noqa: E402

HEADING = "### GPTQ Gram statistics sharded (`--workers`)"
WORKERS = (1, 2)
GRAM_ROWS = 4096  # quantize's default gram_rows


def _grams(task: dict[str, Any]) -> dict[str, Any]:
    import onnx

    from onnxcomp import ir
    from onnxcomp.calibration.collect import Calibrator
    from onnxcomp.calibration.gram import Fanout, InputGram
    from onnxcomp.calibration.shard import CalibrationResources

    model = onnx.load(task["model"])
    graph = ir.import_model(model)
    weighted = [n for n in graph.nodes if n.op == "MatMul" and ir.folded_value(n.inputs[1]) is not None]
    readers: dict[str, list[InputGram]] = {}
    for i, node in enumerate(weighted):  # as quant.statistics.hessian_factories groups them
        gram = InputGram(node, max_rows=GRAM_ROWS, rng=np.random.default_rng([0, i]))
        readers.setdefault(node.inputs[0].name, []).append(gram)
    ids = np.load(task["data"])["input_ids"]
    batches = [{"input_ids": ids[i : i + BATCH]} for i in range(0, len(ids), BATCH)]
    calibrator = Calibrator(model, {name: (lambda g=group: Fanout(g)) for name, group in readers.items()})
    start = time.perf_counter()
    calibrator.run(batches, resources=CalibrationResources(task["workers"]))
    seconds = time.perf_counter() - start
    grams = [g for group in readers.values() for g in group]
    np.savez(task["out"], **{g.layer.label: g.hessian() for g in grams})
    return {"seconds": seconds, "layers": len(grams), "tensors": len(readers), "notes": calibrator.notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # the machine may be shared: the seconds are noisy
    seconds: dict[int, list[float]] = {w: [] for w in WORKERS}
    rss: dict[int, list[float]] = {w: [] for w in WORKERS}
    worst: dict[int, float] = dict.fromkeys(WORKERS, 0.0)
    layers = tensors = 0
    notes: dict[int, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-stats-") as tmp:
        model = Path(tmp, "decoder.onnx")
        write_decoder(model, SHAPE, seed=0)
        data = Path(tmp, "calib.npz")
        np.savez(data, input_ids=np.random.default_rng(0).integers(0, SHAPE.vocab, (SEQUENCES, SEQ_LEN)))
        for round_index in range(args.rounds):
            for workers in WORKERS:
                out = Path(tmp, f"h{workers}.npz")
                task = {"kind": "grams", "model": str(model), "data": str(data), "workers": workers, "out": str(out)}
                child = run_child(__file__, task)
                if not child.ok:
                    raise SystemExit(f"workers={workers}: the child failed: {child.error}")
                seconds[workers].append(child.result["seconds"])
                rss[workers].append(child.peak_rss_mb)
                layers, tensors, notes[workers] = child.result["layers"], child.result["tensors"], child.result["notes"]
                print(round_index, workers, f"{child.result['seconds']:.2f} s", notes[workers], flush=True)
            with np.load(Path(tmp, "h1.npz")) as one:
                for workers in WORKERS[1:]:
                    with np.load(Path(tmp, f"h{workers}.npz")) as other:
                        for name in one.files:
                            scale = max(float(np.abs(one[name]).max()), 1e-300)
                            diff = float(np.abs(other[name] - one[name]).max()) / scale
                            worst[workers] = max(worst[workers], diff)
    base = statistics.median(seconds[1])
    rows = [
        [
            "1 process" if w == 1 else f"{w} worker processes",
            f"{statistics.median(seconds[w]):.2f}",
            f"{base / statistics.median(seconds[w]):.2f}x",
            f"{statistics.median(rss[w]):.0f}",
            "-" if w == 1 else f"{worst[w]:.1e}",
            "; ".join(notes[w]) or "-",
        ]
        for w in WORKERS
    ]
    body = "\n\n".join(
        [
            f"`python bench/scale_stats.py`: GPTQ's statistics of the decoder above, an `InputGram` (`X^T X`, "
            f"float64) for each of its {layers} MatMul weights, fanned out from {tensors} input tensors, over "
            f"{SEQUENCES} sequences of {SEQ_LEN} tokens in batches of {BATCH} (at most {GRAM_ROWS} rows per batch). "
            f"Each configuration in a fresh process, interleaved over {args.rounds} rounds; medians of the "
            "`Calibrator.run` seconds and of the driver's peak RSS (VmHWM, workers not included). 'max rel. diff': "
            "the largest difference of any Hessian entry from the one-process run's, relative to that Hessian's "
            "largest entry (float64 sums added in another order).",
            markdown_table(
                ["configuration", "seconds", "speed-up", "driver peak RSS MiB", "max rel. diff", "notes"],
                rows,
                "lrrrrl",
            ),
            "Each task returns its Gram matrices (about 115 MB of float64 for this model; the q/k/v "
            "projections each keep their own copy, as GPTQ does) and the driver adds them up, so sharding "
            "pays for shipping and merging them per chunk on top of the process start-up; what it "
            "parallelises is the onnxruntime run and the `X^T X` products. Each worker runs its session and "
            "numpy's OpenBLAS on its share of the cores (one thread each here, `blas.limit_blas_threads`): "
            "with every worker's BLAS on all cores the same run gave 1.04x (measured before that limit, load "
            "~3). A multi-node Ray run adds each node's cores; the model goes to the object store once, the "
            "Gram matrices come back per chunk.",
            f"Load average at the start: {load:.1f} (`os.getloadavg`).",
            environment_line(["onnxruntime", "numpy"]),
        ]
    )
    print(body)
    if not args.no_readme:
        write_readme_section(REPO / "bench" / "README.md", HEADING, body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main({"grams": _grams})
    else:
        main()
