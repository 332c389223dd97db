"""The decomposition record: what became what, with ranks and MACs; saved, printed, replayed.

The record is one JSON document (``OUT.decomposition_record.json`` beside the output model)::

    {"format": "onnxcomp-decomposition/1",
     "passes": {"decompose_conv": {"rank_rule": "auto", "align": 16, ...}},
     "nodes": [{"pass": "decompose_conv", "node": "conv4", "op": "Conv",
                "factors": ["conv4_3x1", "conv4_1x3"], "rank": 32, "max_rank": 192,
                "rule": "auto", "detail": {...}, "weight_shape": [64, 64, 3, 3],
                "factor_shapes": [[32, 64, 3, 1], [64, 32, 1, 3]],
                "macs_before": ..., "macs_after": ..., "macs_exact": true, ...}],
     "declined": [{"pass": ..., "node": ..., "reason": ...}]}

Replaying it (pass option ``record``, CLI ``--replay``) applies exactly the recorded rank to
each recorded node of the pass; the factorisation is deterministic, so the same model gives a
byte-identical result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onnxcomp.errors import ConfigError

FORMAT = "onnxcomp-decomposition/1"
ARTIFACT = "decomposition_record"


def new_record() -> dict[str, Any]:
    return {"format": FORMAT, "passes": {}, "nodes": [], "declined": []}


def add_to_artifacts(
    artifacts: dict[str, Any],
    pass_name: str,
    settings: dict[str, Any],
    nodes: list[dict[str, Any]],
    declined: list[tuple[str, str]],
) -> dict[str, Any]:
    """Merge one pass's results into ``artifacts["decomposition_record"]`` (several passes may share it)."""
    record = artifacts.setdefault(ARTIFACT, new_record())
    record["passes"][pass_name] = settings
    record["nodes"].extend(nodes)
    record["declined"].extend({"pass": pass_name, "node": n, "reason": r} for n, r in declined)
    return record


def load_replay(path: str, pass_name: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(recorded entries of ``pass_name`` by node name, its recorded settings) from a record file.

    Raises ConfigError naming the file when it is missing, unreadable or malformed.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such decomposition record") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: not a readable JSON decomposition record ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("nodes"), list):
        raise ConfigError(f'{file}: not a decomposition record (expected "format": "{FORMAT}")')
    entries: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(data["nodes"]):
        if not isinstance(entry, dict) or entry.get("pass") != pass_name:
            continue
        node, rank = entry.get("node"), entry.get("rank")
        if not isinstance(node, str) or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"{file}: nodes[{i}] needs a node name and a positive integer rank")
        if node in entries:
            raise ConfigError(f"{file}: node {node!r} is recorded twice for {pass_name}")
        entries[node] = entry
    passes = data.get("passes")
    settings = passes.get(pass_name, {}) if isinstance(passes, dict) else {}
    return entries, settings if isinstance(settings, dict) else {}


def _rule_text(entry: dict[str, Any]) -> str:
    detail = entry.get("detail", {})
    if entry.get("rule") == "auto" and "evbmf_rank" in detail:
        band = detail.get("band")
        text = f"auto: evbmf {detail['evbmf_rank']}"
        return text + (f", band {band[0]}-{band[1]}" if band else "")
    if "energy_kept" in detail:
        return f"{entry['rule']} (kept {detail['energy_kept']:.3f})"
    return str(entry.get("rule", ""))


def _macs(value: int | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def describe_settings(name: str, settings: dict[str, Any]) -> str:
    """One line saying exactly which rules a pass applied (from the record's ``passes``)."""
    if settings.get("record"):
        rule = f"replay of {settings['record']}"
    elif settings["rank_rule"] == "auto":
        d, wide = settings["band_divisor"], settings["band_divisor_wide"]
        band = (
            (
                f"clamped to [L//{d + 1}, L//{d}] (d={wide} when min(C) >= {settings['wide_channels']}), "
                "L = min(k)*min(C)"
            )
            if d
            else "no clamp"
        )
        rule = f"auto = EVBMF noise-floor rank, {band}"
    else:
        rule = settings["rank_rule"]
    align = settings["align"]
    text = f"{name}: {rule}; " + (f"aligned to {align}" if align > 1 else "no alignment")
    text += (
        f"; too small: min(k)*min(C) < {settings['min_kernel_channels']} or min(k) < "
        f"{settings['small_kernel']} and min(C) < {settings['min_channels']}"
    )
    if settings.get("refit"):
        text += f"; second factors refit on {settings.get('calibration') or 'calibration data'}"
    return text


def format_record(record: dict[str, Any]) -> str:
    """The rules applied, a table of the decomposed nodes and the MAC totals."""
    lines = [f"  {describe_settings(name, settings)}" for name, settings in record["passes"].items()]
    lines += [
        f"  {'node':<24} {'weight':<18} {'rank':>9}  {'rule':<26} {'MACs before -> after':<24} out err² svd -> refit"
    ]
    before = after = 0
    for e in record["nodes"]:
        shape = "x".join(str(d) for d in e["weight_shape"])
        rank = f"{e['rank']}/{e['max_rank']}"
        macs = f"{_macs(e['macs_before'])} -> {_macs(e['macs_after'])} (-{e['macs_saved'] * 100:.1f}%)"
        fit = e.get("refit")
        err = f"{fit['error_svd']:.4f} -> {fit['error_refit']:.4f}" if fit else "-"
        name = e["node"] if len(e["node"]) <= 24 else "..." + e["node"][-21:]
        lines.append(f"  {name:<24} {shape:<18} {rank:>9}  {_rule_text(e)[:26]:<26} {macs:<24} {err}")
        if e.get("macs_exact"):
            before += e["macs_before"]
            after += e["macs_after"]
    if before:
        lines.append(f"  decomposed nodes: {_macs(before)} -> {_macs(after)} MACs (-{(1 - after / before) * 100:.1f}%)")
    if record["declined"]:
        lines.append(f"  {len(record['declined'])} declined (see --verbose)")
    return "\n".join(lines)
