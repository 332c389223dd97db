"""Tensor decomposition shared by the ``decompose_conv`` and ``decompose_matmul`` passes.

* :mod:`~onnxcomp.decomposition.rank` -- rank rules (EVBMF ``auto``, ``energy``, ``ratio``,
  ``rank``), the clamp band and the alignment rounding;
* :mod:`~onnxcomp.decomposition.factor` -- deterministic truncated SVD and the factor weights;
* :mod:`~onnxcomp.decomposition.geometry` -- 2-D conv attributes per axis, output sizes, MACs;
* :mod:`~onnxcomp.decomposition.refit` -- least-squares refit of the second factor on
  calibration activations (streamed normal equations);
* :mod:`~onnxcomp.decomposition.record` -- the JSON record, its table and its replay;
* :mod:`~onnxcomp.decomposition.driver` -- the flow both passes share.
"""

from __future__ import annotations

from onnxcomp.decomposition.rank import (
    RankChoice,
    RankRule,
    choose_rank,
    evbmf_rank,
    parse_rank_rule,
)
from onnxcomp.decomposition.record import ARTIFACT, FORMAT, format_record, load_replay

__all__ = [
    "ARTIFACT",
    "FORMAT",
    "RankChoice",
    "RankRule",
    "choose_rank",
    "evbmf_rank",
    "format_record",
    "load_replay",
    "parse_rank_rule",
]
