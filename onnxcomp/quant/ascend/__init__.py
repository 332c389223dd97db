"""Ascend deploy target: AMCT-compatible deploy model, fake-quant model and record (docs/ascend.md)."""
