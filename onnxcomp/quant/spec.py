"""What to quantize and how: per-role specs, granularities, and config with overrides.

A :class:`TensorSpec` says how one tensor role (weights or activations) is quantized: format,
granularity, symmetry, observer. A :class:`QuantConfig` holds the global defaults, overrides by
op type and by node-name glob, and a skip list; :meth:`QuantConfig.for_node` resolves the spec of
one node. Invalid combinations are :class:`ConfigError` saying what is allowed.

Granularity semantics follow ``docs/formats.md#granularity-量化粒度``: per-tensor (weights and
static activations), per-channel (weights, one scale per output channel), per-group (weights,
groups of ``size`` along the reduction axis), per-token (activations, one scale per row computed
at run time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from onnxcomp.errors import ConfigError
from onnxcomp.formats import available_formats, get_format
from onnxcomp.ir import match_glob

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Ops quantized by default: onnxruntime's CPU provider has no integer ConvTranspose kernel, so a
#: quantized ConvTranspose only adds dequantization work there (list it in ``ops`` to quantize it).
DEFAULT_OPS = ("Conv", "Gemm", "MatMul")
WEIGHT_OBSERVERS = ("minmax", "mse", "output_mse")
ACTIVATION_OBSERVERS = ("minmax", "percentile", "entropy", "mse", "histogram")
GROUP_SIZES = (32, 64, 128, 256)
#: Formats activations can use (the 4-bit float formats are weight-only).
ACTIVATION_FORMATS = ("int8", "uint8", "int4", "uint4", "int16", "uint16", "fp8_e4m3", "fp8_e5m2", "hif8", "mxfp8")
#: Spellings of "leave this role in float" (a global default, or a pin on an op type or node).
FLOAT_SPELLINGS = ("float", "none")


@dataclass(frozen=True)
class Granularity:
    """``kind`` in tensor | channel | group | token | dynamic; ``size`` is the group size for ``group``.

    ``token`` and ``dynamic`` are activation granularities computed at run time: one scale per row
    (per token), or one per tensor (``dynamic``: onnxruntime's fused DynamicQuantizeLinear pattern).
    """

    kind: str
    size: int = 0

    def __str__(self) -> str:
        return f"group:{self.size}" if self.kind == "group" else self.kind


def parse_granularity(text: str, where: str = "granularity") -> Granularity:
    """``tensor``, ``channel``, ``group:128`` (or ``group`` = 128), ``token`` or ``dynamic``."""
    value = text.strip().lower()
    aliases = {
        "per-tensor": "tensor",
        "per_tensor": "tensor",
        "per-channel": "channel",
        "per_channel": "channel",
        "per-token": "token",
        "per_token": "token",
        "dynamic-tensor": "dynamic",
        "dynamic_tensor": "dynamic",
    }
    value = aliases.get(value, value)
    if value in ("tensor", "channel", "token", "dynamic"):
        return Granularity(value)
    if value.startswith(("group", "per-group", "per_group")):
        _, _, size = value.partition(":")
        try:
            n = int(size) if size else 128
        except ValueError:
            n = -1
        if n <= 0 or n % 2:
            raise ConfigError(
                f"{where}: bad group size in {text!r}; use group:N with N in {', '.join(map(str, GROUP_SIZES))}"
            )
        return Granularity("group", n)
    raise ConfigError(f"{where}: unknown granularity {text!r}; use tensor, channel, group:N, token or dynamic")


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor role is quantized."""

    dtype: str
    granularity: Granularity = Granularity("tensor")
    symmetric: bool = True
    observer: str = "minmax"
    observer_options: tuple[tuple[str, Any], ...] = ()
    #: Two-level scales: per-group scales stored in this format under a per-channel fp32 scale.
    scale_format: str | None = None

    def options(self) -> dict[str, Any]:
        return dict(self.observer_options)

    def describe(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        return f"{self.dtype}/{self.granularity}/{sym}/{self.observer}"


@dataclass(frozen=True)
class NodeSpec:
    """The resolved plan of one node: weight spec and activation spec (None = not quantized).

    ``pinned`` names the roles ("weights", "activations") an op-type or node-name override set:
    a choice made by hand, which an automatic search must leave as it is.
    """

    weights: TensorSpec | None
    activations: TensorSpec | None
    pinned: tuple[str, ...] = ()


_SPEC_KEYS = ("dtype", "granularity", "symmetric", "observer", "scale_format")


def _format_names() -> list[str]:
    return list(available_formats())


def _check_dtype(dtype: str, where: str) -> None:
    names = _format_names()
    if dtype not in names:
        raise ConfigError(f"{where}: unknown format {dtype!r}; known formats: {', '.join(names)}")


def _format_kind(dtype: str) -> str:
    return get_format(dtype).kind


def is_float(value: Any) -> bool:
    """Whether ``value`` spells "leave in float": "float" or "none" (any case)."""
    return isinstance(value, str) and value.strip().lower() in FLOAT_SPELLINGS


def parse_tensor_spec(data: Any, role: str, base: TensorSpec | None, where: str) -> TensorSpec | None:
    """A spec from config data: a format name, "float" (alias "none": not quantized), or a table
    of spec keys + observer options.

    Keys not given inherit from ``base`` (the global default for that role).
    """
    if data is None:
        return base
    if isinstance(data, str):
        data = {"dtype": data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a format name or a table, got {data!r}")
    if is_float(data.get("dtype")):
        return None
    values: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
    if base is not None:
        values["granularity"] = base.granularity
        values["observer_options"] = dict(base.observer_options)
    options = dict(values.get("observer_options", {}))
    for key, value in data.items():
        if key == "dtype":
            values["dtype"] = str(value).lower()
        elif key == "granularity":
            values["granularity"] = parse_granularity(str(value), f"{where}.granularity")
        elif key == "symmetric":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.symmetric: expected true or false, got {value!r}")
            values["symmetric"] = value
        elif key == "observer":
            values["observer"] = str(value)
        elif key == "scale_format":
            values["scale_format"] = None if str(value).lower() == "none" else str(value).lower()
        elif key in _OBSERVER_OPTION_KEYS:
            options[key] = value
        else:
            valid = ", ".join((*_SPEC_KEYS, *_OBSERVER_OPTION_KEYS))
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {valid}")
    if "dtype" not in values:
        raise ConfigError(f"{where}: no dtype given for {role}")
    _check_dtype(values["dtype"], f"{where}.dtype")
    if "symmetric" not in data and _format_kind(values["dtype"]) != "int":
        values["symmetric"] = True  # float formats are symmetric; don't inherit an int default
    if "granularity" not in data and "dtype" in data:
        default = _DEFAULT_GRANULARITY.get((role, values["dtype"]))
        if default is not None:
            values["granularity"] = default
    if "observer" not in data and "dtype" in data and (role, values["dtype"]) in _DEFAULT_OBSERVER:
        values["observer"] = _DEFAULT_OBSERVER[(role, values["dtype"])]
    values["observer_options"] = tuple(sorted(options.items()))
    values.setdefault("granularity", Granularity("tensor" if role == "activations" else "channel"))
    values.setdefault("symmetric", True)
    values.setdefault("observer", "minmax")
    spec = TensorSpec(**values)
    validate_spec(spec, role, where)
    return spec


#: Observer options a spec may carry (forwarded to the observer / range policy).
_OBSERVER_OPTION_KEYS = ("percentile", "num_bins", "num_quant_bins", "steps", "search")


def validate_spec(spec: TensorSpec, role: str, where: str) -> None:
    """Reject the combinations onnxcomp cannot honour, saying what is allowed."""
    _check_dtype(spec.dtype, where)
    kind = _format_kind(spec.dtype)
    g = spec.granularity.kind
    if role == "weights":
        if g in ("token", "dynamic"):
            raise ConfigError(
                f"{where}: {'per-token' if g == 'token' else 'dynamic'} granularity is for activations; "
                "weights take tensor, channel or group:N"
            )
        if spec.observer not in WEIGHT_OBSERVERS:
            raise ConfigError(
                f"{where}: weight observer {spec.observer!r} unknown; use one of {', '.join(WEIGHT_OBSERVERS)}"
            )
    else:
        if g in ("channel", "group"):
            raise ConfigError(
                f"{where}: {g} granularity is for weights; activations take tensor (static), token or dynamic"
            )
        if spec.observer not in ACTIVATION_OBSERVERS:
            raise ConfigError(
                f"{where}: activation observer {spec.observer!r} unknown; use one of {', '.join(ACTIVATION_OBSERVERS)}"
            )
    if role == "weights" and kind == "mx" and spec.granularity != Granularity("group", 32):
        raise ConfigError(
            f"{where}: {spec.dtype} weights always use 32-element blocks along the reduction axis; "
            "omit granularity or set group:32"
        )
    if spec.scale_format is not None and not (
        role == "weights"
        and spec.dtype in ("fp4_e2m1", "fp4_e1m2")
        and g == "group"
        and spec.scale_format == "fp8_e4m3"
    ):
        raise ConfigError(
            f"{where}: scale_format (two-level scales) is for fp4_e2m1/fp4_e1m2 weights with group:N granularity, "
            'with scale_format = "fp8_e4m3"'
        )
    if role == "weights" and spec.dtype == "hif8" and g == "group":
        raise ConfigError(f"{where}: hif8 weights take a per-tensor or per-channel scale; use tensor or channel")
    if role == "activations":
        if spec.dtype not in ACTIVATION_FORMATS:
            raise ConfigError(
                f"{where}: {spec.dtype} activations are not supported; use one of {', '.join(ACTIVATION_FORMATS)}"
            )
        if g == "dynamic" and spec.dtype not in ("int8", "uint8"):
            raise ConfigError(
                f"{where}: dynamic per-tensor activations are 8-bit integers (onnxruntime's DynamicQuantizeLinear "
                "is uint8); use int8/uint8, or granularity token for other formats"
            )
        if spec.dtype == "mxfp8" and g != "token":
            raise ConfigError(
                f"{where}: mxfp8 activations are dynamic (32-element blocks along the last axis); use granularity token"
            )
    if kind != "int" and not spec.symmetric:
        raise ConfigError(f"{where}: {spec.dtype} is a float format and is always symmetric; set symmetric = true")


@dataclass
class QuantConfig:
    """Global defaults plus overrides by op type and node-name glob, and a skip list."""

    weights: TensorSpec | None
    activations: TensorSpec | None
    ops: tuple[str, ...] = DEFAULT_OPS
    skip: tuple[str, ...] = ()
    by_op: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    by_name: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def for_node(self, name: str, op: str) -> NodeSpec | None:
        """The resolved spec of a node, or None when it is not quantized (skipped / op not listed)."""
        if op not in self.ops or match_glob(name, self.skip):
            return None
        pins = self._pins(name, op)
        weights = pins.get("weights", self.weights)
        activations = pins.get("activations", self.activations)
        if weights is None and activations is None:
            return None
        return NodeSpec(weights, activations, tuple(pins))

    def pinned_float(self, name: str, op: str) -> bool:
        """Whether an override pins this node entirely to float (it is then not quantized at all)."""
        if op not in self.ops or match_glob(name, self.skip):
            return False
        pins = self._pins(name, op)
        return (
            bool(pins)
            and pins.get("weights", self.weights) is None
            and pins.get("activations", self.activations) is None
        )

    def _pins(self, name: str, op: str) -> dict[str, TensorSpec | None]:
        """Role -> spec set by the op-type overrides, then the node-name ones (later ones win)."""
        pins: dict[str, TensorSpec | None] = {}
        for table, key_matches in (
            (self.by_op, lambda k: k == op),
            (self.by_name, lambda k: match_glob(name, (k,)) is not None),
        ):
            for key, (w, a) in table.items():
                if key_matches(key):
                    for role, value in (("weights", w), ("activations", a)):
                        if value is not _INHERIT:
                            pins[role] = value
        return {role: pins[role] for role in ("weights", "activations") if role in pins}


_INHERIT: Any = object()


def emulated_reason(spec: NodeSpec) -> str | None:
    """What of a node's spec onnxruntime's CPU provider has no integer kernel for ("int16
    activations"), or None. Such Q/DQ runs, with the node computing in float between the DQs: the
    kernel report says so instead of calling the node unfused."""
    a, w = spec.activations, spec.weights
    if a is not None and (get_format(a.dtype).kind != "int" or get_format(a.dtype).bits > 8):
        return f"{a.dtype} activations"
    if w is not None and get_format(w.dtype).kind == "int" and get_format(w.dtype).bits > 8:
        return f"{w.dtype} weights"
    return None


def parse_config(data: Mapping[str, Any], where: str = "quantize") -> QuantConfig:
    """Build a :class:`QuantConfig` from the quantize pass's config data.

    Keys: ``weights``, ``activations`` (format name, "none", or a table), ``ops``, ``skip``,
    ``op_types`` (table: op type -> {weights, activations}) and ``nodes`` (table: node-name glob
    -> {weights, activations}).
    """
    known = ("weights", "activations", "ops", "skip", "op_types", "nodes")
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(known)}")
    weights = parse_tensor_spec(data.get("weights", "int8"), "weights", _DEFAULT_WEIGHTS, f"{where}.weights")
    activations = parse_tensor_spec(
        data.get("activations", "uint8"), "activations", _DEFAULT_ACTIVATIONS, f"{where}.activations"
    )
    ops = tuple(data.get("ops", DEFAULT_OPS))
    bad = [o for o in ops if o not in QUANTIZABLE_OPS]
    if bad:
        raise ConfigError(f"{where}.ops: {bad[0]!r} cannot be quantized; quantizable ops: {', '.join(QUANTIZABLE_OPS)}")
    overrides: dict[str, dict[str, tuple[Any, Any]]] = {"op_types": {}, "nodes": {}}
    for table in ("op_types", "nodes"):
        for key, entry in dict(data.get(table, {})).items():
            w_where = f"{where}.{table}.{key}"
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{w_where}: expected a table with weights and/or activations")
            extra = [k for k in entry if k not in ("weights", "activations")]
            if extra:
                raise ConfigError(f"{w_where}: unknown key {extra[0]!r}; valid keys: weights, activations")
            if table == "op_types" and key not in QUANTIZABLE_OPS:
                raise ConfigError(
                    f"{w_where}: {key!r} is not a quantizable op; use one of {', '.join(QUANTIZABLE_OPS)}"
                )
            w = (
                parse_tensor_spec(entry["weights"], "weights", weights or _DEFAULT_WEIGHTS, f"{w_where}.weights")
                if "weights" in entry
                else _INHERIT
            )
            a = (
                parse_tensor_spec(
                    entry["activations"], "activations", activations or _DEFAULT_ACTIVATIONS, f"{w_where}.activations"
                )
                if "activations" in entry
                else _INHERIT
            )
            overrides[table][key] = (w, a)
    return QuantConfig(
        weights, activations, ops, tuple(data.get("skip", ())), overrides["op_types"], overrides["nodes"]
    )


def parse_embedding_spec(data: Any, where: str = "quantize.embeddings") -> TensorSpec | None:
    """The spec of embedding tables: ``none``, ``int8`` (one scale per row) or ``int4`` (per group along a row)."""
    spec = parse_tensor_spec(data, "weights", None, where)
    if spec is None:
        return None
    if spec.dtype == "int8":
        return TensorSpec("int8", Granularity("channel"), True, spec.observer)
    if spec.dtype == "int4":
        g = spec.granularity if spec.granularity.kind == "group" else Granularity("group", 32)
        if g.size < 16 or g.size & (g.size - 1):
            raise ConfigError(f"{where}: int4 embeddings take group:N with N a power of two >= 16")
        return TensorSpec("int4", g, True, spec.observer)
    raise ConfigError(f"{where}: embedding tables are stored as int8 (per row) or int4 (per group); got {spec.dtype!r}")


#: Granularity a format implies when the config names the format but no granularity.
_DEFAULT_GRANULARITY = {
    ("weights", "mxfp8"): Granularity("group", 32),
    ("weights", "mxfp4"): Granularity("group", 32),
    ("weights", "fp4_e2m1"): Granularity("group", 32),
    ("weights", "fp4_e1m2"): Granularity("group", 32),
    ("activations", "mxfp8"): Granularity("token"),
}

#: Observer a format implies when the config names the format but no observer: 4-bit integer
#: grids (15 levels symmetric) gain most from the clipping search (MiniLM INT4 block 32: cosine
#: 0.9839 with the amax rule, 0.9868 searched).
_DEFAULT_OBSERVER = {("weights", "int4"): "mse", ("weights", "uint4"): "mse"}

_DEFAULT_WEIGHTS = TensorSpec("int8", Granularity("channel"), True, "minmax")
#: uint8, not int8: on x86, onnxruntime fuses int8 activations only where a tensor has a single
#: reader (docs/onnxruntime.md#int8-activations-with-several-readers-stay-float); the grids are equal.
#: The histogram-error search beats minmax on the OCR recognizer, detector and MiniLM and ties on
#: the demo; minmax is ahead on the PP-OCR classifier (docs/algorithms.md, bench/README.md
#: "Accuracy algorithms"); it costs 1.0-1.9x minmax's quantize time.
_DEFAULT_ACTIVATIONS = TensorSpec("uint8", Granularity("tensor"), False, "histogram")
