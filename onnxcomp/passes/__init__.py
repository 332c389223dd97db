"""Built-in passes. Importing this package registers every pass (one module per pass)."""

from __future__ import annotations

from onnxcomp.passes import (
    decompose_conv,
    decompose_matmul,
    dedupe_initializers,
    distill,
    flush_denormals,
    fold_affine,
    fold_batchnorm,
    fold_weight_constants,
    fuse_hardswish,
    fuse_matmul_add,
    lower_batchnorm,
    prune_channels,
    quantize,
    remove_identity,
    sparsify_2to4,
)

__all__ = [
    "decompose_conv",
    "decompose_matmul",
    "dedupe_initializers",
    "distill",
    "flush_denormals",
    "fold_affine",
    "fold_batchnorm",
    "fold_weight_constants",
    "fuse_hardswish",
    "fuse_matmul_add",
    "lower_batchnorm",
    "prune_channels",
    "quantize",
    "remove_identity",
    "sparsify_2to4",
]
