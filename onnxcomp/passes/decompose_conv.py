"""decompose_conv: split k x k convolutions into a low-rank k x 1 + 1 x k pair (tensor decomposition)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper, numpy_helper

from onnxcomp import ir
from onnxcomp.decomposition.driver import (
    DecomposeOptions,
    Decomposer,
    Target,
    run_decomposition,
    too_small,
)
from onnxcomp.decomposition.factor import conv_factors, conv_matrix
from onnxcomp.decomposition.geometry import (
    ConvGeometry,
    batch_of,
    conv_macs,
    conv_spatial,
)
from onnxcomp.decomposition.refit import ConvRows, Probe
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.registry import register_pass
from onnxcomp.ir import describe, float_weight, is_onnx_op


class _ConvDecomposer(Decomposer):
    pass_name = "decompose_conv"
    ops = ("Conv",)

    def match(self, graph: ir.Graph, node: ir.Node) -> Target | str:
        if not is_onnx_op(node):
            return f"it is in domain {node.domain!r}, not ai.onnx"
        weight = float_weight(node, 1, "weight")
        if isinstance(weight, str):
            return weight
        if weight.ndim != 4:
            return f"it is a {weight.ndim - 2}-D convolution; only 2-D convolutions are decomposed"
        geometry = ConvGeometry.of(node, weight.shape)
        if isinstance(geometry, str):
            return geometry
        cout, cin, kh, kw = weight.shape
        if geometry.group != 1:
            kind = "depthwise, " if cin == 1 else ""  # weight (Cout, Cin/group, kh, kw)
            return f"it is grouped ({kind}group={geometry.group}); only group=1 is decomposed"
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = float_weight(node, 2, "bias")
            if isinstance(bias, str):
                return bias
            if bias.shape != (cout,):
                return f"the bias of {describe(node)} has shape {bias.shape}, expected ({cout},)"
        self.known_shape(graph, node.inputs[0])
        spatial = conv_spatial(node, geometry)
        before, per_rank, exact = conv_macs(cin, cout, geometry, spatial, batch_of(node.inputs[0].shape))
        return Target(
            node,
            weight,
            conv_matrix(weight),
            min(kh, kw),
            min(cin, cout),
            before,
            per_rank,
            exact,
            geometry,
            {"kernel": [kh, kw]},
        )

    def policy(self, target: Target) -> str | None:
        o: DecomposeConv.Options = self.options
        g: ConvGeometry = target.geometry
        kh, kw = g.kernel
        if min(kh, kw) < o.min_kernel:
            return f"its kernel {kh}x{kw} has a side < {o.min_kernel}"
        if max(g.dilations) > 1 and not o.allow_dilation:
            return f"it is dilated (dilations={list(g.dilations)}); set allow_dilation = true to decompose it"
        if max(g.strides) > o.max_stride:
            return f"its stride {list(g.strides)} exceeds {o.max_stride}"
        return too_small(o, target.kernel, target.channels)

    def factor_shapes(self, target: Target, rank: int) -> list[list[int]]:
        cout, cin, kh, kw = target.weight.shape
        return [[rank, cin, kh, 1], [cout, rank, 1, kw]]

    def _weights(self, target: Target, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w1, w2 = conv_factors(first, second, target.weight.shape)
        return w1.astype(target.weight.dtype), w2.astype(target.weight.dtype)

    def _bias(self, target: Target) -> np.ndarray | None:
        node = target.node
        if len(node.inputs) > 2 and node.inputs[2].name:
            return ir.folded_value(node.inputs[2])  # read as float_weight read it (through a chain)
        return None

    def probe(self, target: Target, first: np.ndarray, second: np.ndarray, index: int) -> Probe:
        g: ConvGeometry = target.geometry
        cout, _, _, kw = target.weight.shape
        rank = first.shape[1]
        w1, _ = self._weights(target, first, second)
        prefix = f"__onnxcomp_refit_{index}"
        x, y = target.node.inputs[0].name, target.node.outputs[0].name
        side = helper.make_node("Conv", [x, f"{prefix}_w"], [f"{prefix}_z"], name=prefix, **g.axis_attrs(0))
        bias = self._bias(target)
        prior = np.concatenate(
            [
                second.reshape(rank, cout, kw).transpose(0, 2, 1).reshape(rank * kw, cout),
                (bias.astype(np.float64) if bias is not None else np.zeros(cout))[None, :],
            ]
        )

        return Probe(
            (f"{prefix}_z", y),
            ConvRows(g, kw),  # picklable: sharded calibration sends it to workers
            prior,
            intercept=True,
            nodes=[side],
            initializers=[numpy_helper.from_array(w1, f"{prefix}_w")],
        )

    def from_solution(self, target: Target, solution: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        cout, _, _, kw = target.weight.shape
        rank = (solution.shape[0] - 1) // kw
        second = solution[:-1].reshape(rank, kw, cout).transpose(0, 2, 1).reshape(rank, cout * kw)
        return second, solution[-1]

    def emit(
        self, graph: ir.Graph, target: Target, first: np.ndarray, second: np.ndarray, bias: np.ndarray | None
    ) -> list[str]:
        node, g = target.node, target.geometry
        kh, kw = g.kernel
        base = node.name or node.outputs[0].name
        wname = node.inputs[1].name
        w1, w2 = self._weights(target, first, second)
        c1 = ir.make_constant(ir.unique_name(graph, f"{wname}_{kh}x1"), w1)
        c2 = ir.make_constant(ir.unique_name(graph, f"{wname}_1x{kw}"), w2)
        x, out = node.inputs[0], node.outputs[0]
        inputs2: list[ir.Tensor] = [c2]
        old_bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if bias is not None:
            source = self._bias(target) if old_bias is not None else target.weight
            assert source is not None  # match() declined a bias that is not a constant float (float_weight)
            dtype = source.dtype
            inputs2.append(ir.make_constant(ir.unique_name(graph, f"{base}_bias_1x{kw}"), bias.astype(dtype)))
        elif old_bias is not None:
            inputs2.append(old_bias)
        z = ir.make_variable(graph, f"{base}_{kh}x1_out", dtype=target.weight.dtype)
        n1 = ir.make_node(graph, "Conv", [x, c1], [z], name=f"{base}_{kh}x1", attrs=g.axis_attrs(0))
        n2 = ir.make_node(graph, "Conv", [z, *inputs2], [out], name=f"{base}_1x{kw}", attrs=g.axis_attrs(1))
        node.inputs.clear()
        node.outputs.clear()
        return [n1.name, n2.name]


@register_pass
class DecomposeConv(Pass):
    """Split each k x k Conv into Conv(r, Cin, kh, 1) -> Conv(Cout, r, 1, kw) by truncated SVD.

    The weight is viewed as the matrix with rows (Cin, kh) and columns (Cout, kw) and factored at
    rank r (``rank_rule``: ``auto`` = EVBMF noise-floor estimate clamped to the reference
    toolkit's band, ``energy:E``, ``ratio:R`` = ``round(R * min(Cin, Cout))``, ``rank:N``; then
    aligned to ``align``). Each factor keeps stride, padding and dilation of its own spatial axis
    only; ``auto_pad`` is kept on both (exact); asymmetric pads are split per axis; the bias goes
    on the second factor. With calibration data (and ``refit``), the second factor and its bias
    are refit by least squares so the pair matches the original output on real activations. The
    record (``OUT.decomposition_record.json``) can be replayed with ``record = "path.json"``.

    Declines, with the reason: Convs not in ai.onnx, with a non-constant or non-float weight or
    bias, not 2-D, or grouped (incl. depthwise); and, by policy (not when replaying), a kernel
    side < ``min_kernel``, a stride > ``max_stride``, a dilated Conv unless ``allow_dilation``
    (the factorisation handles dilation exactly; the default declines it like the reference
    toolkit), a "too small" Conv (``min(k) * min(Cin, Cout) < min_kernel_channels``, or
    ``min(k) < small_kernel`` and ``min(Cin, Cout) < min_channels``), and a rank whose pair
    would not need fewer MACs than the Conv (``require_saving``).
    """

    name = "decompose_conv"
    keeps_outputs_close = False  # removes capacity at a chosen ratio: validation checks shapes, not values

    @dataclass(frozen=True)
    class Options(DecomposeOptions):
        min_kernel: int = 3  # decline kernels with a side below this
        max_stride: int = 2  # decline strides above this
        allow_dilation: bool = False  # decompose dilated convs too (exact; declined by default)

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        result = run_decomposition(graph, ctx, _ConvDecomposer(self.options))
        for node, where in ir.body_nodes(graph, ("Conv",)):
            result.declined.append((node.name, f"{where}: layers are decomposed in the main graph only"))
        return result
