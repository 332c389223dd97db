"""Learning independent blocks in parallel: worker processes or Ray actors (``teacher_input`` only).

With ``teacher_input`` every block learns from the teacher's input and the teacher's output, both
collected before any block is learned, and from a generator seeded by the block's name: a block's
result depends on nothing another block learns. (A block that learns its input's clipping range
is that input's only consumer, so no other block reads the range it learns.) So the blocks can be
learned in any order, anywhere, and :func:`learn_blocks` returns, byte for byte, what the
sequential loop of :func:`onnxcomp.quant.distill.driver.distill_plans` computes: learning is a
pure function of its arguments on single-threaded BLAS (:func:`onnxcomp.quant.distill.train.learn_block`).

In the default mode each block learns from the *student's* input, which runs every earlier
block's learned weights: block k cannot start before block k - 1 is done, so blocks run one after
another (:data:`SEQUENTIAL_NOTE`).

Per task a worker receives one block's tensors (its input and its teacher output, which no other
block reads) and its learnable weight; what every task shares, the settings, is shipped once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from onnxcomp.analysis.trial_pool import PoolResources, run_tasks
from onnxcomp.quant.distill.block import Tail
from onnxcomp.quant.distill.clip import InputQuantizer
from onnxcomp.quant.distill.grid import GridWeight
from onnxcomp.quant.distill.rows import Layer, RowSource
from onnxcomp.quant.distill.train import Learned, Settings, learn_block

SEQUENTIAL_NOTE = (
    "distill: blocks learned one after another: each learns from the student's input, which runs every "
    "earlier block's learned weights (--teacher-input makes blocks independent, learned in parallel on "
    "--workers N / --ray)"
)


@dataclass
class BlockJob:
    """What learning one block needs, as the sequential loop would pass it to ``learn_block``."""

    node: str
    layer: Layer
    grid: GridWeight
    bias: np.ndarray | None
    tails: list[Tail]
    rng: np.random.Generator
    quantizer: InputQuantizer | None  # the block input's static quantizer (None: float input)
    x: np.ndarray  # the teacher's input of the block
    target: np.ndarray  # the teacher's output at the block's end


def learn_one(settings: Settings, job: BlockJob) -> Learned:
    """One block, exactly as the sequential loop learns it (in a worker or here)."""
    x, iq = job.x, job.quantizer
    if iq is not None and not iq.learn:
        x, iq = iq.fake(np.asarray(x)), None  # once on the tensor (cheaper than on every sampled row)
    source = RowSource(job.layer, np.asarray(x))
    return learn_block(
        source, np.asarray(job.target), job.layer, job.grid, job.bias, job.tails, settings, job.rng, None, iq
    )


def learn_blocks(settings: Settings, jobs: Sequence[BlockJob], resources: PoolResources) -> dict[str, Learned]:
    """Every job's block learned on the workers of ``resources``; node name -> result."""

    def items() -> Iterator[tuple[str, BlockJob]]:
        for job in jobs:
            yield f"distilling the block of node {job.node!r}", job

    learned = run_tasks(learn_one, settings, items(), resources)
    return {job.node: result for job, result in zip(jobs, learned, strict=True)}
