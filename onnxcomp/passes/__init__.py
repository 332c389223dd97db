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
