"""`onnxcomp inspect`: parameters by dtype, MACs by hand, op histogram, I/O."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import conv_bn_model

from onnxcomp.analysis.inspect import summarize
from onnxcomp.cli.main import main


def test_summary_numbers() -> None:
    s = summarize(conv_bn_model())
    assert s.opset == 17
    assert s.ops["Conv"] == 1 and s.ops["BatchNormalization"] == 1 and s.ops["Identity"] == 1
    # conv 8*3*3*3 + 8, bn 4*8, fc 4*8 + 4
    assert s.params_by_dtype == {"float": {"count": 216 + 8 + 32 + 32 + 4, "bytes": 4 * 292}}
    # Conv: N=1, Cout 8, 8x8 output, Cin 3, 3x3 kernel; Gemm: 1x8x4
    assert s.macs_by_op == {"Conv": 8 * 64 * 3 * 9, "Gemm": 32}
    assert s.macs_total == 8 * 64 * 27 + 32
    assert [(t.name, t.shape) for t in s.inputs] == [("x", ["N", 3, 8, 8])]


def test_inspect_cli(conv_bn_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(conv_bn_path)]) == 0
    text = capsys.readouterr().out
    assert "opset 17" in text and "MACs (batch 1): 13.86k" in text and "Conv 1" in text
    assert main(["inspect", "--json", str(conv_bn_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["param_count"] == 292 and data["macs_total"] == 13856


def test_inspect_input_shape_sets_the_mac_count(capsys: pytest.CaptureFixture[str]) -> None:
    demo = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
    assert main(["inspect", str(demo), "--json"]) == 0
    batch1 = json.loads(capsys.readouterr().out)["macs_total"]
    name = "input"
    assert main(["inspect", str(demo), "--json", "--input-shape", f"{name}=4,1,16,16"]) == 0
    assert json.loads(capsys.readouterr().out)["macs_total"] == 4 * batch1
    with pytest.raises(SystemExit):
        main(["inspect", str(demo), "--input-shape", "input=4,x"])
    assert main(["inspect", str(demo), "--input-shape", "nope=1,2"]) != 0
