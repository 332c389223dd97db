"""``prepare``: an ONNX model -> a trainable torch module with the quantization ``quantize`` writes.

The float model goes through the deployment fusions (and a sparsity pass, when asked) exactly as
``onnxcomp quantize`` / ``sparsify`` would run them; the ``quantize`` pass then runs on that float
model, and its record says where every Q/DQ went, with which granularity and PTQ scales. The
module interprets the *float* graph and fake-quantizes at exactly those tensors, starting from
those scales (LSQ-style learnable). ``export`` writes the quantized model back by replacing the
codes and scales of that same PTQ output: same structure, same record, the learned values.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.errors import ConfigError, OnnxCompError
from onnxcomp.formats import IntegerFormat, get_format
from onnxcomp.ir.mapped import tensor_values
from onnxcomp.model_io import save_model
from onnxcomp.qat.engine import torch
from onnxcomp.qat.fakequant import RUN_TIME_QUANTIZERS, FakeQuant, run_time_quantizer
from onnxcomp.qat.interpreter import GraphModule
from onnxcomp.qat.reemit import FLOAT_ACTIVATIONS, put_float_activation_scales
from onnxcomp.qat.storage import (
    WeightStorage,
    find_storage,
    packed_initializers,
    put_activation_scales,
    put_folded_bias,
    stored_codes,
)
from onnxcomp.quant.qparams import dequantize
from onnxcomp.quant.qparams import quantize as quantize_codes
from onnxcomp.quant.qweight import storage_array

#: Ops that move values without changing them: their output on the input's grid shares its quantizer.
PASS_THROUGH = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Identity")


@dataclass
class _Slot:
    """Where one learned tensor goes in the exported model (initializer names of the PTQ output)."""

    codes: str | None
    scale: str
    zero_point: str | None = None


@dataclass
class _BiasSlot:
    bias: str  # float model's bias initializer
    activation: str  # the tensor whose scale s_x multiplies
    weight: str  # the weight whose scale s_w multiplies
    slot: _Slot = field(default_factory=lambda: _Slot(None, ""))


def _producer_index(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


class QATModule(torch.nn.Module):
    """The float graph with fake-quant (and fixed sparsity masks) where ``quantize`` puts Q/DQ.

    ``forward(feeds)`` returns ``{output name: tensor}``; ``quantized(False)`` switches every
    fake-quant off (float mode: the float model, as onnxruntime computes it).
    """

    def __init__(
        self, float_model: onnx.ModelProto, quantized_model: onnx.ModelProto | None, record: list[dict[str, Any]]
    ) -> None:
        super().__init__()
        self.graph = GraphModule(float_model, "prepared float model")
        self.float_model = float_model
        self.quantized_model = quantized_model
        self.record = record
        #: builds the same pipeline's ``emit="simulate"`` output on demand (set by ``prepare``)
        self.simulation_source: Callable[[], onnx.ModelProto] | None = None
        self.weight_quant = torch.nn.ModuleDict()
        self.act_quant = torch.nn.ModuleDict()
        # run-time input quantizers under keys "t0", "t1", ... (torch refuses "." in a node name)
        self.token_quant = torch.nn.ModuleDict()
        self._token_keys: dict[str, str] = {}  # node name -> its key in token_quant
        self._weight_keys: dict[str, str] = {}
        self._act_keys: dict[str, str] = {}
        self._weight_slots: dict[str, WeightStorage] = {}
        self._act_slots: dict[str, _Slot] = {}
        #: static FP8 / HiF8 activations (exact subgraphs, onnxcomp.qat.reemit): tensor -> (format, PTQ scale)
        self._float_acts: dict[str, tuple[str, float]] = {}
        self._biases: dict[str, _BiasSlot] = {}
        if quantized_model is not None:
            self._attach(quantized_model, record)
        # pruned / n:m layers: zeros that stay zeros (the mask multiplies the weight on every read)
        self.masks: dict[str, torch.Tensor] = {}
        for name in self.graph.weight_keys:
            w = self.graph.weight(name)
            if w.dim() >= 2 and bool((w == 0).any()):
                self.masks[name] = (w != 0).to(w.dtype)
        self.graph.weight_view = self._weight_view
        self.graph.tensor_view = self._tensor_view
        if len(self.token_quant):
            self.graph.input_view = self._input_view

    # -- building -------------------------------------------------------------------------------
    def _attach(self, q: onnx.ModelProto, record: list[dict[str, Any]]) -> None:
        producers = _producer_index(q)
        self._inits = {t.name: t for t in q.graph.initializer}
        self._float_producers = _producer_index(self.float_model)
        nodes = {n.name: n for n in q.graph.node}
        float_nodes = {n.name: n for n in self.float_model.graph.node}
        for entry in record:
            where = f"node {entry.get('node')!r}"
            w = entry.get("weights")
            if w is not None:
                self._attach_weight(entry, where, nodes)
            acts = [*(entry.get("activations") or []), *(entry.get("outputs") or [])]
            if isinstance(entry.get("activations"), dict) and self._attach_token(entry):
                acts = []
            elif isinstance(entry.get("activations"), dict):
                raise ConfigError(
                    f"{where}: {entry['activations']['dtype']} {entry['activations'].get('granularity')} activations "
                    "are computed at run time; quantization-aware training supports static per-tensor activations "
                    f"(int8/uint8/int4/uint4/{'/'.join(FLOAT_ACTIVATIONS)}), per-token integer / FP8 / HiF8, MXFP8 "
                    "and per-tensor dynamic uint8 ones"
                )
            for a in acts:
                self._attach_activation(a, where, nodes)
            if entry.get("bias") == "int32":
                qnode = nodes[entry["node"]]
                dq = producers[qnode.input[2]]
                fnode = float_nodes[entry["node"]]
                self._biases[fnode.input[2]] = _BiasSlot(
                    fnode.input[2],
                    entry["activations"][0]["tensor"],
                    w["tensor"] if w is not None else "",
                    _Slot(dq.input[0], dq.input[1]),
                )

    def _attach_token(self, entry: dict[str, Any]) -> bool:
        """The run-time quantizer of ``entry``'s node input (``fakequant.run_time_quantizer``); False if none."""
        a = entry["activations"]
        node = {n.name: n for n in self.float_model.graph.node}[entry["node"]]
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        axis = 1 if node.op_type in ("Conv", "ConvTranspose") else (0 if node.op_type == "Gemm" and trans_a else -1)
        fq = run_time_quantizer(a["dtype"], str(a.get("granularity")), axis)
        if fq is not None:
            self._token_keys[entry["node"]] = key = f"t{len(self._token_keys)}"
            self.token_quant[key] = fq
        return fq is not None

    def _attach_weight(self, entry: dict[str, Any], where: str, nodes: dict[str, onnx.NodeProto]) -> None:
        w = entry["weights"]
        name = w["tensor"]
        if name in self._weight_keys:
            return
        if name not in self.graph.weight_keys:
            raise ConfigError(
                f"{where}: quantize rewrote its weight into {name!r}, which the float model lacks; "
                "skip the node (--skip) to train the rest"
            )
        assert self.quantized_model is not None
        float_node = {n.name: n for n in self.float_model.graph.node}[entry["node"]]
        storage = find_storage(self.quantized_model, entry, float_node, nodes, self._inits)
        scale = np.asarray(w["scale"] if storage.fixed_scale is None else storage.fixed_scale, np.float32)
        values = int(np.prod(w["shape"])) // max(1, scale.size)
        key = f"q{len(self._weight_keys)}"
        self._weight_keys[name] = key
        zp = np.asarray(w["zero_point"]) if storage.fixed_scale is None else np.zeros(scale.shape, np.float32)
        self.weight_quant[key] = FakeQuant(
            w["dtype"], scale, zp, w["axis"], w["block_size"], values, storage.grid, storage.learn_scale
        )
        self._weight_slots[name] = storage

    def _attach_activation(self, a: dict[str, Any], where: str, nodes: dict[str, onnx.NodeProto]) -> None:
        name = a["tensor"]
        if name in self._act_keys:
            return
        qnode = nodes.get(f"{name}_QuantizeLinear")
        floating = a["dtype"] in FLOAT_ACTIVATIONS
        if not floating and (qnode is None or not isinstance(get_format(a["dtype"]), IntegerFormat)):
            raise ConfigError(
                f"{where}: activation {name!r} ({a['dtype']}) is not a QuantizeLinear/DequantizeLinear pair; "
                f"quantization-aware training supports static integer and {'/'.join(FLOAT_ACTIVATIONS)} activations"
            )
        key = self._shared_activation(name, a) or f"a{len(self._act_keys)}"
        self._act_keys[name] = key
        if floating:
            self._float_acts[name] = (a["dtype"], float(a["scale"]))
        else:
            assert qnode is not None
            self._act_slots[name] = _Slot(None, qnode.input[1], qnode.input[2] if len(qnode.input) > 2 else None)
        if key in self.act_quant:
            return
        self.act_quant[key] = FakeQuant(
            a["dtype"], np.asarray(a["scale"], np.float32), np.asarray(round(a["zero_point"]))
        )

    def _shared_activation(self, name: str, a: dict[str, Any]) -> str | None:
        """The key of the quantizer ``name`` shares: a reshuffle of a tensor quantized on the same grid.

        Flatten(relu4_out) gets relu4_out's range, scale and zero point from calibration; its values
        are already on that grid, so a scale of its own would get no gradient and drift apart from it.
        """
        node = self._float_producers.get(name)
        if node is None or node.op_type not in PASS_THROUGH or not node.input:
            return None
        key = self._act_keys.get(node.input[0])
        if key is None:
            return None
        fq = self.act_quant[key]
        assert isinstance(fq, FakeQuant)
        same = fq.dtype == a["dtype"] and float(fq.scale.detach()) == float(a["scale"])
        return key if same and float(fq.zero_point) == float(a["zero_point"]) else None

    # -- running --------------------------------------------------------------------------------
    def quantized(self, enabled: bool = True) -> QATModule:
        """Fake-quant on (the quantized model) or off (the float model); returns self."""
        for fq in [*self.weight_quant.values(), *self.act_quant.values(), *self.token_quant.values()]:
            assert isinstance(fq, (FakeQuant, *RUN_TIME_QUANTIZERS))
            fq.enabled = enabled
        return self

    def _fq(self, table: torch.nn.ModuleDict, keys: dict[str, str], name: str) -> FakeQuant | None:
        key = keys.get(name)
        return None if key is None else table[key]  # type: ignore[return-value]

    def scale_of(self, tensor: str) -> np.ndarray:
        """The current (learned) scale of a quantized weight or activation tensor."""
        fq = self._fq(self.weight_quant, self._weight_keys, tensor) or self._fq(self.act_quant, self._act_keys, tensor)
        if fq is None:
            raise KeyError(f"{tensor!r} is not a quantized tensor of this module")
        return fq.scale.detach().numpy().copy()

    def _weight_view(self, name: str, w: torch.Tensor) -> torch.Tensor:
        mask = self.masks.get(name)
        if mask is not None:
            w = w * mask
        fq = self._fq(self.weight_quant, self._weight_keys, name)
        if fq is not None:
            return fq(w)
        bias = self._biases.get(name)
        if bias is not None:
            return self._int32_bias(bias, w)
        return w

    def _int32_bias(self, bias: _BiasSlot, b: torch.Tensor) -> torch.Tensor:
        """The bias on the int32 grid of scale ``s_x * s_w`` (what QLinearConv / QGemm add)."""
        act = self._fq(self.act_quant, self._act_keys, bias.activation)
        weight = self._fq(self.weight_quant, self._weight_keys, bias.weight)
        if act is None or weight is None or not act.enabled:
            return b
        s = (act.effective_scale(b) * weight.scale.clamp_min(1e-30)).reshape(-1)
        flat = b.reshape(-1)
        return (flat + (torch.round(flat.double() / s.double()).float() * s - flat).detach()).reshape(b.shape)

    def _input_view(self, node: str, value: torch.Tensor) -> torch.Tensor:
        key = self._token_keys.get(node)
        fq = self.token_quant[key] if key is not None else None
        return fq(value) if fq is not None else value

    def _tensor_view(self, name: str, value: torch.Tensor) -> torch.Tensor:
        fq = self._fq(self.act_quant, self._act_keys, name)
        return fq(value) if fq is not None else value

    def forward(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.graph(feeds)

    @property
    def input_names(self) -> list[str]:
        return self.graph.input_names

    @property
    def output_names(self) -> list[str]:
        return self.graph.output_names

    # -- exporting ------------------------------------------------------------------------------
    def learned_float_model(self) -> onnx.ModelProto:
        """The float model with the trained weights (masks applied): what a float retraining exports."""
        model = copy.deepcopy(self.float_model)
        for init in model.graph.initializer:
            if init.name in self.graph.weight_keys:
                value = self._masked(init.name)
                init.CopyFrom(numpy_helper.from_array(value, init.name))
        return model

    def _masked(self, name: str) -> np.ndarray:
        w = self.graph.weight(name).detach()
        mask = self.masks.get(name)
        return (w * mask if mask is not None else w).numpy().astype(np.float32)

    def _learned_weight(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stored codes, dequantized weight, scale) of quantized weight ``name`` as trained."""
        fq = self._fq(self.weight_quant, self._weight_keys, name)
        assert fq is not None
        storage = self._weight_slots[name]
        w = self._masked(name)
        scale = fq.scale.detach().clamp_min(1e-30).numpy().astype(np.float32)
        wide_scale = fq._broadcast(torch.from_numpy(scale), torch.from_numpy(w)).numpy()
        if storage.grid is None:  # integer codes: the codec's own rounding
            fmt = get_format(fq.dtype)
            assert isinstance(fmt, IntegerFormat)
            wide_zp = fq._broadcast(fq.zero_point, torch.from_numpy(w)).numpy().astype(np.int32)
            codes = quantize_codes(fmt, w, wide_scale, wide_zp)
            return storage_array(codes, fmt), dequantize(fmt, codes, wide_scale, wide_zp), scale
        values = fq.nearest(torch.from_numpy(np.divide(w, wide_scale, dtype=np.float32))).numpy()
        deq = np.multiply(values, wide_scale, dtype=np.float32)
        return stored_codes(storage, fq.dtype, values), deq, scale

    def _put_trained_floats(self, model: onnx.ModelProto) -> None:
        """Trained float parameters (biases, normalization) into the same-named initializers of ``model``.

        Only values training changed are written: an untrained export keeps the PTQ bytes.
        """
        quantized = {*self._weight_slots, *self._biases}
        for init in model.graph.initializer:
            if init.name in self.graph.weight_keys and init.name not in quantized:
                value = self._masked(init.name)
                if init.data_type == onnx.TensorProto.FLOAT and tuple(init.dims) == value.shape:
                    if not np.array_equal(tensor_values(init), value):
                        init.CopyFrom(numpy_helper.from_array(value, init.name))

    def simulation_model(self) -> onnx.ModelProto:
        """The fake-quant simulation model (``quantize``'s ``emit="simulate"``) with the learned values."""
        if self.quantized_model is None:
            return self.learned_float_model()
        if self.simulation_source is None:
            raise OnnxCompError("this module has no simulation source: build it with onnxcomp.qat.prepare")
        model = self.simulation_source()
        inits = {t.name: t for t in model.graph.initializer}
        for name in self._weight_slots:
            target = inits.get(f"{name}_fakequant")
            if target is None:
                raise OnnxCompError(f"simulation model: no fake-quant weight {name}_fakequant for {name!r}")
            target.CopyFrom(numpy_helper.from_array(self._learned_weight(name)[1], target.name))
        put_activation_scales(model, {name: self.scale_of(name) for name in self._act_slots})
        self._put_trained_floats(model)
        put_float_activation_scales(model, self._float_scales(), "simulation model")
        return model

    def export(
        self, path: str | os.PathLike[str], simulation: str | os.PathLike[str] | None = None, force: bool = False
    ) -> None:
        """Save the deployable model at ``path`` (and the simulation model at ``simulation``)."""
        save_model(self.export_model(), path, overwrite=force)
        if simulation is not None:
            save_model(self.simulation_model(), simulation, overwrite=force)

    def export_model(self) -> onnx.ModelProto:
        """The deployable model: the PTQ output with the learned codes and scales (the float model if none)."""
        if self.quantized_model is None:
            return self.learned_float_model()
        model = copy.deepcopy(self.quantized_model)
        inits = {t.name: t for t in model.graph.initializer}

        def put(name: str, value: np.ndarray) -> None:
            old = inits[name]
            old.CopyFrom(numpy_helper.from_array(value.reshape(tuple(old.dims)), name))

        for name, storage in self._weight_slots.items():
            codes, deq, scale = self._learned_weight(name)
            if storage.kind == "integer_kernel":  # MatMulInteger takes (K, N): a transB Gemm's codes transposed
                put(storage.codes, codes.T if storage.transposed else codes)
                put(storage.scale, scale)
                put_folded_bias(storage, self._masked, inits, put)
                continue
            if storage.kind != "matmulnbits":
                put(storage.codes, codes)
                if storage.kind != "dq2":  # two-level scales stay fixed
                    put(storage.scale, scale)
                continue
            fq = self._fq(self.weight_quant, self._weight_keys, name)
            assert fq is not None
            zp = fq.zero_point.numpy().astype(np.int32).reshape(scale.shape)
            for init_name, value in packed_initializers(
                storage, codes, scale, zp, fq.axis, fq.block_size, deq, None
            ).items():
                put(init_name, value)
            put_folded_bias(storage, self._masked, inits, put)
        put_activation_scales(model, {name: self.scale_of(name) for name in self._act_slots})
        for bias in self._biases.values():
            act = self._fq(self.act_quant, self._act_keys, bias.activation)
            weight = self._fq(self.weight_quant, self._weight_keys, bias.weight)
            assert act is not None and weight is not None and bias.slot.codes is not None
            x_scale = np.float32(act.scale.detach().clamp_min(1e-30).item())
            scale = (x_scale * weight.scale.detach().clamp_min(1e-30).numpy().astype(np.float32)).astype(np.float32)
            b = self.graph.weight(bias.bias).detach().numpy().astype(np.float64).reshape(-1)
            b = np.broadcast_to(b, scale.shape) if scale.size > 1 and b.size == 1 else b
            q = np.clip(np.rint(b / scale.astype(np.float64)), np.iinfo(np.int32).min, np.iinfo(np.int32).max)
            put(bias.slot.codes, q.astype(np.int32))
            put(bias.slot.scale, scale)
        self._put_trained_floats(model)
        put_float_activation_scales(model, self._float_scales(), "exported model")
        return model

    def _float_scales(self) -> dict[str, tuple[str, float, float]]:
        """tensor -> (format, PTQ scale, learned scale) of the FP8 / HiF8 activations."""
        return {
            name: (dtype, ptq, float(self.scale_of(name).reshape(-1)[0]))
            for name, (dtype, ptq) in self._float_acts.items()
        }
