"""Built-in passes. Importing this package registers every pass (one module per pass)."""

from __future__ import annotations

from onnxcomp.passes import (
    decompose_conv,
    decompose_matmul,
    dedupe_initializers,
    flush_denormals,
    fold_affine,
    fold_batchnorm,
    fuse_matmul_add,
    lower_batchnorm,
    prune_channels,
    quantize,
    remove_identity,
    sparsify_2to4,
)

__all__ = [
    "FUSE_PIPELINE",
    "with_fusions",
    "decompose_conv",
    "decompose_matmul",
    "dedupe_initializers",
    "flush_denormals",
    "fold_affine",
    "fold_batchnorm",
    "fuse_matmul_add",
    "lower_batchnorm",
    "prune_channels",
    "quantize",
    "remove_identity",
    "sparsify_2to4",
]

#: The order ``onnxcomp fuse`` runs the deployment fusions in.
FUSE_PIPELINE: tuple[str, ...] = (
    "remove_identity",
    "fold_batchnorm",
    "fuse_matmul_add",
    "fold_affine",
    "lower_batchnorm",
    "flush_denormals",
    "dedupe_initializers",
)


def with_fusions(passes: list, fuse: bool = True) -> list:
    """``passes`` preceded by the deployment fusions (as pass instances) when ``fuse``.

    Compression front-ends (quantize, sparsify, decompose) run the fusions first so BatchNorm is
    folded before weights are quantized, pruned or factored.
    """
    from onnxcomp.pipeline import make_pass

    return [*(make_pass(name) for name in (FUSE_PIPELINE if fuse else ())), *passes]
