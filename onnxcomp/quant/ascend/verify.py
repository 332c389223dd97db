"""``onnxcomp verify-ascend``: run a deploy model without an NPU and check it against its siblings.

The deploy model runs on the reference interpreter; ``OUT.fake_quant.onnx`` (when beside it) on
onnxruntime with graph optimizations off, so the two must agree to float rounding; the record
``OUT.record.txt`` (when beside it) is walked against the deploy model node by node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxcomp.errors import OnnxCompError
from onnxcomp.quant.ascend.consistency import record_mismatches
from onnxcomp.quant.ascend.record import parse_record
from onnxcomp.quant.ascend.reference import deploy_session
from onnxcomp.runtime import ort_session


@dataclass
class Verification:
    """What ``verify_deploy`` found: per output the largest |deploy - fake-quant|, record problems."""

    outputs: list[str]
    samples: int = 0
    max_abs: dict[str, float] = field(default_factory=dict)
    max_ref: dict[str, float] = field(default_factory=dict)
    record_problems: list[str] | None = None  # None: no record beside the model
    fake_quant: bool = False

    def ok(self, atol: float) -> bool:
        return not self.record_problems and all(v <= atol for v in self.max_abs.values())

    def lines(self, atol: float) -> list[str]:
        out = [f"ran {self.samples} samples through the deploy model (numpy reference interpreter)"]
        if not self.fake_quant:
            out.append("no fake-quant model beside it: outputs not compared")
        for name in self.outputs if self.fake_quant else []:
            verdict = "ok" if self.max_abs[name] <= atol else f"DIFFERS (> {atol:g})"
            out.append(
                f"  {name}: max |deploy - fake_quant| {self.max_abs[name]:.3g} (|y| <= {self.max_ref[name]:.3g}) {verdict}"
            )
        if self.record_problems is None:
            out.append("no record beside it: record not checked")
        elif self.record_problems:
            out += [f"record: {p}" for p in self.record_problems]
        else:
            out.append("record: every quantized node agrees with the deploy model")
        return out


def sibling(deploy: Path, suffix: str) -> Path:
    stem = deploy.name[: -len(".onnx")] if deploy.name.endswith(".onnx") else deploy.name
    return deploy.with_name(f"{stem}.{suffix}")


def verify_deploy(
    deploy_path: Path, batches: Callable[[], Iterable[Mapping[str, np.ndarray]]], max_batches: int | None = None
) -> Verification:
    """Run ``deploy_path`` on the interpreter over ``batches()``; compare with its fake-quant model; walk its record."""
    if not deploy_path.is_file():
        raise OnnxCompError(f"{deploy_path}: no such deploy model")
    deploy = onnx.load(str(deploy_path))
    if not any(n.op_type == "AscendDequant" for n in deploy.graph.node):
        raise OnnxCompError(
            f"{deploy_path}: has no AscendDequant node; pass the deploy model of quantize --target ascend"
        )
    record_path = sibling(deploy_path, "record.txt")
    entries = parse_record(record_path.read_text(encoding="utf-8"), str(record_path)) if record_path.is_file() else None
    int4 = {k for k, v in entries.items() if v.wts_type == "INT4"} if entries is not None else None
    session = deploy_session(deploy, int4)
    fake_path = sibling(deploy_path, "fake_quant.onnx")
    fake = ort_session(fake_path, level="disable") if fake_path.is_file() else None
    outputs = [o.name for o in deploy.graph.output]
    result = Verification(outputs, fake_quant=fake is not None)
    result.record_problems = record_mismatches(deploy, entries) if entries is not None else None
    for i, feeds in enumerate(batches()):
        if max_batches is not None and i >= max_batches:
            break
        got = session.run(None, dict(feeds))
        result.samples += int(next(iter(feeds.values())).shape[0]) if feeds else 0
        if fake is None:
            continue
        names = {x.name for x in fake.get_inputs()}
        want = fake.run(None, {k: v for k, v in feeds.items() if k in names})
        for name, a, b in zip(outputs, got, want, strict=True):
            diff = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0.0))
            result.max_abs[name] = max(result.max_abs.get(name, 0.0), diff)
            ref = float(np.abs(np.asarray(b, np.float64)).max(initial=0.0))
            result.max_ref[name] = max(result.max_ref.get(name, 0.0), ref)
    return result
