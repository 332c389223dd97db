"""The pass lists behind ``onnxcomp sparsify`` and ``onnxcomp.api.sparsify``.

One kind of sparsity per run: ``pattern`` (n:m, ``sparsify_2to4``) or ``prune_ratio``
(``prune_channels``), after the deployment fusions (BatchNorm folded first, so pruning sees the
folded weights) and optionally followed by ``quantize`` (the combined recipe: sparsify, then
quantize; the quantizer keeps every pruned zero exactly zero). As a TOML recipe::

    [[passes]]
    pass = "fold_batchnorm"
    [[passes]]
    pass = "prune_channels"
    ratio = 0.25
    round_to = 8
    [[passes]]
    pass = "quantize"
    weights = { dtype = "int8", granularity = "channel" }
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from onnxcomp.errors import OnnxCompError
from onnxcomp.pipeline import Pass, make_pass


def sparsify_passes(
    *,
    pattern: str | None = None,
    prune_ratio: float | None = None,
    fuse: bool = True,
    prune_options: Mapping[str, Any] | None = None,
    skip: Sequence[str] = (),
    quantize: str | None = None,
    activations: str | None = None,
    granularity: str = "channel",
) -> list[Pass]:
    """Fusions (unless ``fuse=False``), one sparsity pass, then ``quantize`` if a weight format is given.

    ``activations`` defaults to ``none`` (weight-only) for the quantize step; pass ``"int8"`` (with
    calibration data) for static INT8 activations.
    """
    from onnxcomp.api import quantize_options
    from onnxcomp.passes import with_fusions

    if (pattern is None) == (prune_ratio is None):
        raise OnnxCompError(
            "choose one kind of sparsity: a pattern (e.g. --pattern 2:4) or a channel ratio (--prune-ratio 0.3)"
        )
    passes: list[Pass] = with_fusions([], fuse)
    if pattern is not None:
        passes.append(make_pass("sparsify_2to4", {"pattern": pattern, "skip": list(skip)}))
    else:
        options = {"ratio": prune_ratio, "skip": list(skip), **dict(prune_options or {})}
        passes.append(make_pass("prune_channels", options))
    if quantize is not None:
        quant = quantize_options(weights=quantize, activations=activations or "none", granularity=granularity,
                                 skip=skip)
        passes.append(make_pass("quantize", quant))
    return passes
