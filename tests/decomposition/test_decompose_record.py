"""The decomposition record: saved beside the output, replayed byte for byte, CLI and API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from decomp_models import conv_macs

from onnxcomp.analysis.inspect import summarize
from onnxcomp.analysis.metrics import accuracy, predict
from onnxcomp.api import decompose
from onnxcomp.cli.main import main
from onnxcomp.decomposition import format_record
from onnxcomp.errors import OnnxCompError, PassError

DEMO = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
DEMO_OPTIONS = {"min_channels": 16}  # the demo's convs have 16..64 channels


def test_record_is_saved_and_replays_byte_identically(tmp_path: Path) -> None:
    out, again = tmp_path / "out.onnx", tmp_path / "again.onnx"
    decompose(DEMO, out, calibration=CALIB, options=DEMO_OPTIONS)
    record_path = tmp_path / "out.decomposition_record.json"
    record = json.loads(record_path.read_text())
    assert record["format"] == "onnxcomp-decomposition/1"
    assert [(e["node"], e["factors"], e["rank"]) for e in record["nodes"]] == [
        ("conv2", ["conv2_3x1", "conv2_1x3"], 16),
        ("conv3", ["conv3_3x1", "conv3_1x3"], 16),
        ("conv4", ["conv4_3x1", "conv4_1x3"], 32),
    ]
    assert all(e["macs_after"] < e["macs_before"] for e in record["nodes"])
    assert record["declined"] == [
        {"pass": "decompose_conv", "node": "conv1", "reason": "too small: min(kernel) * min(channels) = 3 * 1 < 16"}
    ]
    # the replay ignores the rank rule and the policy: exactly the recorded ranks, nodes
    decompose(DEMO, again, calibration=CALIB, replay=record_path, rank_rule="rank:64")
    assert again.read_bytes() == out.read_bytes()
    without = decompose(DEMO, replay=record_path).result("decompose_conv")  # no calibration data
    assert any("differs from the recorded model" in note for note in without.notes)
    # and the resolved recipe reproduces it too
    assert (
        main(
            [
                "-q",
                "run",
                str(tmp_path / "out.recipe.toml"),
                str(DEMO),
                "-o",
                str(tmp_path / "r.onnx"),
                "--calib",
                str(CALIB),
            ]
        )
        == 0
    )
    assert (tmp_path / "r.onnx").read_bytes() == out.read_bytes()


def test_replay_without_calibration_and_edited_ranks(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    decompose(DEMO, out, options=DEMO_OPTIONS)
    record_path = tmp_path / "out.decomposition_record.json"
    decompose(DEMO, tmp_path / "again.onnx", replay=record_path)
    assert (tmp_path / "again.onnx").read_bytes() == out.read_bytes()
    record = json.loads(record_path.read_text())
    record["nodes"] = [dict(record["nodes"][2], rank=48)]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(record))
    report = decompose(DEMO, replay=edited)
    nodes = report.result("decompose_conv").data["record"]["nodes"]
    assert [(e["node"], e["rank"], e["rule"]) for e in nodes] == [("conv4", 48, "replay")]
    declined = dict(report.result("decompose_conv").declined)
    assert declined["conv2"] == "not in the replayed record"


def test_replay_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(PassError, match="not a decomposition record"):
        decompose(DEMO, replay=bad)
    with pytest.raises(PassError, match="no such decomposition record"):
        decompose(DEMO, replay=tmp_path / "missing.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        json.dumps(
            {
                "format": "onnxcomp-decomposition/1",
                "nodes": [{"pass": "decompose_conv", "node": "conv4", "rank": 16, "weight_shape": [64, 32, 3, 3]}],
            }
        )
    )
    shapes = r"node 'conv4' had weight shape \[64, 32, 3, 3\], the model has \[64, 64, 3, 3\]"
    with pytest.raises(PassError, match=shapes):
        decompose(DEMO, replay=wrong)
    with pytest.raises(OnnxCompError, match="unknown decomposition option 'min_channel'"):
        decompose(DEMO, options={"min_channel": 3})


def test_api_keywords_and_options() -> None:
    by_option = decompose(DEMO, options={"rank_rule": "rank:16", "align": 1, "min_channels": 16})
    settings = by_option.result("decompose_conv").data["record"]["passes"]["decompose_conv"]
    assert (settings["rank_rule"], settings["align"]) == ("rank:16", 1)
    by_keyword = decompose(DEMO, rank_rule="ratio:0.5", options={"rank_rule": "rank:16", "min_channels": 16})
    assert by_keyword.result("decompose_conv").data["record"]["passes"]["decompose_conv"]["rank_rule"] == "ratio:0.5"


def test_demo_auto_rule_meets_the_issue_target() -> None:
    """Automatic rule + refit: >= 30% fewer conv MACs, accuracy within 1 point of fp32."""
    held = np.load(MODELS / "digits_heldout.npz")
    fp32 = decompose(DEMO, options={"min_channels": 10**6}).model  # fused, nothing decomposed
    report = decompose(DEMO, calibration=CALIB, options=DEMO_OPTIONS)
    record = report.result("decompose_conv").data["record"]
    settings = record["passes"]["decompose_conv"]
    assert settings["rank_rule"] == "auto" and settings["refit"] is True
    text = format_record(record)  # says exactly which rule the automatic mode used
    assert "auto = EVBMF noise-floor rank, clamped to [L//7, L//6] (d=4 when min(C) >= 256)" in text
    assert "min(k) < 7 and min(C) < 16; second factors refit on digits_calib.npz (128 samples)" in text
    assert [e["detail"]["band"] for e in record["nodes"]] == [[6, 8], [13, 16], [27, 32]]
    assert 1 - conv_macs(report.model) / conv_macs(fp32) >= 0.30
    base = accuracy(predict(fp32, {"input": held["input"]}), held["label"])
    got = accuracy(predict(report.model, {"input": held["input"]}), held["label"])
    assert got >= base - 1.0, (got, base)


def test_cli_decompose_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.onnx"
    assert main(["decompose", str(DEMO), "-o", str(out), "--rank-rule", "ratio:0.5", "--min-channels", "16"]) == 0
    text = capsys.readouterr().out
    assert "decompose_conv" in text and "32/192" in text and "decomposed nodes:" in text
    assert (tmp_path / "d.decomposition_record.json").exists() and (tmp_path / "d.recipe.toml").exists()
    assert summarize(onnx.load(str(out))).ops["Conv"] == 7
    assert main(["inspect", "--json", str(out)]) == 0
    macs = json.loads(capsys.readouterr().out)["macs_by_op"]["Conv"]
    fp32 = decompose(DEMO, options={"min_channels": 10**6}).model
    assert macs == conv_macs(onnx.load(str(out))) < conv_macs(fp32)
    again = tmp_path / "again.onnx"
    replay = str(tmp_path / "d.decomposition_record.json")
    assert main(["-q", "decompose", str(DEMO), "-o", str(again), "--replay", replay]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_cli_usage_and_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["decompose", str(DEMO), "-o", str(tmp_path / "x.onnx"), "--rank-rule", "energy:2"])
    assert exc.value.code == 2 and "rank rule 'energy:2'" in capsys.readouterr().err
    assert main(["decompose", str(DEMO), "-o", str(tmp_path / "x.onnx"), "--replay", str(tmp_path / "no.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such decomposition record" in err


def test_matmul_and_conv_share_one_record(tmp_path: Path) -> None:
    out = tmp_path / "both.onnx"
    decompose(DEMO, out, layers="all", rank_rule="rank:16", options={"min_channels": 16})
    record = json.loads((tmp_path / "both.decomposition_record.json").read_text())
    assert set(record["passes"]) == {"decompose_conv", "decompose_matmul"}
    assert {e["pass"] for e in record["nodes"]} == {"decompose_conv", "decompose_matmul"}
    decompose(DEMO, tmp_path / "again.onnx", layers="all", replay=tmp_path / "both.decomposition_record.json")
    assert (tmp_path / "again.onnx").read_bytes() == out.read_bytes()
