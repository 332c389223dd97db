"""Conv, ConvTranspose, Gemm and MatMul as one grouped matrix product on sampled output rows.

A row is one output position: a (sample, row) of a MatMul/Gemm, or a (sample, y, x) of a Conv.
Its input is the layer's receptive field there (im2col of just the sampled positions, so a
mini-batch costs what its rows cost, not what the whole feature map costs). ConvTranspose is the
Conv of the stride-dilated input with the flipped, channel-swapped kernel. The weight maps to a
``(groups, out per group, K)`` matrix and back (:meth:`Layer.to_matrix`, :meth:`Layer.from_matrix`),
so the one forward/backward in :mod:`onnxcomp.quant.distill.block` serves every kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp import ir


@dataclass(frozen=True)
class Layer:
    """The geometry of one quantized layer (enough to rebuild its output from its input)."""

    op: str
    weight_shape: tuple[int, ...]
    transposed_weight: bool = False  # Gemm transB: the weight is (N, K)
    group: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begin..., end...
    output_padding: tuple[int, ...] = ()

    @property
    def spatial(self) -> bool:
        return self.op in ("Conv", "ConvTranspose")

    @property
    def out_channels(self) -> int:
        if self.op == "Conv":
            return self.weight_shape[0]
        if self.op == "ConvTranspose":
            return self.weight_shape[1] * self.group
        return self.weight_shape[0] if self.transposed_weight else self.weight_shape[-1]

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as ``(groups, out per group, K)``."""
        if self.op == "Conv":
            return w.reshape(self.group, w.shape[0] // self.group, -1)
        if self.op == "ConvTranspose":
            cin, og = w.shape[0], w.shape[1]
            g = w.reshape(self.group, cin // self.group, og, *w.shape[2:])
            flipped = g[(slice(None),) * 3 + (slice(None, None, -1),) * (w.ndim - 2)]
            return np.swapaxes(flipped, 1, 2).reshape(self.group, og, -1)
        return w[None] if self.transposed_weight else w.T[None]

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        """The adjoint of :meth:`to_matrix` (a pure permutation of entries)."""
        shape = self.weight_shape
        if self.op == "Conv":
            return m.reshape(shape)
        if self.op == "ConvTranspose":
            cin, og = shape[0], shape[1]
            g = m.reshape(self.group, og, cin // self.group, *shape[2:])
            g = np.swapaxes(g, 1, 2)
            return g[(slice(None),) * 3 + (slice(None, None, -1),) * (len(shape) - 2)].reshape(shape)
        return m[0] if self.transposed_weight else m[0].T


def layer_of(node: ir.Node, weight_shape: tuple[int, ...]) -> Layer | str:
    """The geometry of ``node`` with a weight of ``weight_shape``, or why it cannot be distilled."""
    a = node.attrs
    if node.op in ("Gemm", "MatMul"):
        if node.op == "Gemm" and (a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0):
            return "Gemm with transA or alpha != 1"
        if len(weight_shape) != 2:
            return f"{len(weight_shape)}-D MatMul weight (batched weights are not distilled)"
        return Layer(node.op, weight_shape, transposed_weight=node.op == "Gemm" and bool(a.get("transB", 0)))
    if node.op not in ("Conv", "ConvTranspose"):
        return f"op {node.op} is not distilled"
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or "output_shape" in a:
        return "auto_pad / output_shape: give explicit pads"
    nd = len(weight_shape) - 2
    if nd not in (1, 2):
        return f"{nd}-D convolution (1-D and 2-D are distilled)"
    pads = tuple(int(p) for p in a.get("pads", [0] * 2 * nd))
    return Layer(
        node.op,
        weight_shape,
        group=int(a.get("group", 1)),
        kernel=tuple(weight_shape[2:]),
        strides=tuple(int(s) for s in a.get("strides", [1] * nd)),
        dilations=tuple(int(d) for d in a.get("dilations", [1] * nd)),
        pads=pads,
        output_padding=tuple(int(p) for p in a.get("output_padding", [0] * nd)),
    )


def _as_2d(x: np.ndarray) -> np.ndarray:
    """A 1-D convolution's (N, C, L) as (N, C, 1, L)."""
    return x[:, :, None, :] if x.ndim == 3 else x


class RowSource:
    """The sampled rows of one layer over a stored input: ``rows(index)`` and ``targets(y, index)``.

    For spatial layers the input is padded (or stride-dilated and padded for ConvTranspose) once,
    channels last, so gathering a receptive field is one fancy index.
    """

    def __init__(self, layer: Layer, x: np.ndarray) -> None:
        self.layer = layer
        if not layer.spatial:
            self.flat = x.reshape(-1, x.shape[-1])
            self.count = self.flat.shape[0]
            return
        x4 = _as_2d(x)
        nd = len(layer.kernel)
        kernel = layer.kernel if nd == 2 else (1, *layer.kernel)
        dil = layer.dilations if nd == 2 else (1, *layer.dilations)
        pads = layer.pads if nd == 2 else (0, layer.pads[0], 0, layer.pads[1])
        if layer.op == "ConvTranspose":
            stride = layer.strides if nd == 2 else (1, *layer.strides)
            outpad = layer.output_padding if nd == 2 else (0, *layer.output_padding)
            n, c, h, w = x4.shape
            dilated = np.zeros((n, c, (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1), x4.dtype)
            dilated[:, :, :: stride[0], :: stride[1]] = x4
            x4 = dilated
            full = [dil[i] * (kernel[i] - 1) for i in range(2)]
            before = [full[0] - pads[0], full[1] - pads[1]]
            after = [full[0] - pads[2] + outpad[0], full[1] - pads[3] + outpad[1]]
            self.strides: tuple[int, int] = (1, 1)
        else:
            before, after = [pads[0], pads[1]], [pads[2], pads[3]]
            self.strides = tuple(layer.strides) if nd == 2 else (1, layer.strides[0])  # type: ignore[assignment]
        # negative padding crops (ConvTranspose with large pads)
        crop = tuple(slice(max(0, -b), x4.shape[2 + i] - max(0, -a)) for i, (b, a) in enumerate(zip(before, after)))
        x4 = x4[:, :, crop[0], crop[1]]
        padded = np.pad(
            x4, [(0, 0), (0, 0), (max(0, before[0]), max(0, after[0])), (max(0, before[1]), max(0, after[1]))]
        )
        self.xt = np.ascontiguousarray(padded.transpose(0, 2, 3, 1))  # N, H, W, C
        self.kernel, self.dil = kernel, dil
        n, hp, wp, _ = self.xt.shape
        self.out_hw = tuple((hp - dil[i] * (kernel[i] - 1) - 1) // self.strides[i] + 1 for i, hp in enumerate((hp, wp)))
        self.count = n * self.out_hw[0] * self.out_hw[1]

    def rows(self, index: np.ndarray) -> np.ndarray:
        """``(P, groups, K)`` inputs of the output rows ``index`` (flat over samples and positions)."""
        g = self.layer.group
        if not self.layer.spatial:
            return self.flat[index][:, None, :]
        oh, ow = self.out_hw
        n, rest = np.divmod(index, oh * ow)
        y, x = np.divmod(rest, ow)
        hi = y[:, None] * self.strides[0] + np.arange(self.kernel[0]) * self.dil[0]
        wi = x[:, None] * self.strides[1] + np.arange(self.kernel[1]) * self.dil[1]
        patch = self.xt[n[:, None, None], hi[:, :, None], wi[:, None, :]]  # P, kh, kw, C
        p, kh, kw, c = patch.shape
        patch = patch.reshape(p, kh, kw, g, c // g).transpose(0, 3, 4, 1, 2)
        return patch.reshape(p, g, -1)

    def targets(self, y: np.ndarray, index: np.ndarray) -> np.ndarray:
        """``(P, out channels)`` of the layer-shaped tensor ``y`` at the rows ``index``."""
        if not self.layer.spatial:
            return y.reshape(-1, y.shape[-1])[index]
        y4 = _as_2d(y)
        oh, ow = self.out_hw
        n, rest = np.divmod(index, oh * ow)
        r, c = np.divmod(rest, ow)
        return y4[n, :, r, c]

    def assemble(self, rows: np.ndarray, samples: int) -> np.ndarray:
        """Rows of every position (in order) back into the layer's output layout."""
        if not self.layer.spatial:
            return rows
        oh, ow = self.out_hw
        out = rows.reshape(samples, oh, ow, -1).transpose(0, 3, 1, 2)
        return out[:, :, 0, :] if len(self.layer.kernel) == 1 else out


def matmul_rows(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``(P, groups, K) x (groups, O, K) -> (P, groups * O)``."""
    out = np.einsum("pgk,gok->pgo", rows, matrix, optimize=True)
    return out.reshape(out.shape[0], -1)
