"""One vocabulary across the API, the CLI and recipes; old spellings work with a deprecation warning."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from conftest import MODELS

from onnxcomp import sparsify
from onnxcomp.api import decompose
from onnxcomp.cli.main import main
from onnxcomp.errors import ConfigError, RecipeError
from onnxcomp.framework import make_pass, recipe_from_data

DEMO = MODELS / "digits_cnn.onnx"


def test_renamed_pass_options_map_to_the_new_names() -> None:
    with pytest.warns(DeprecationWarning, match="'reconstruct' is deprecated.*'refit'"):
        old = make_pass("prune_channels", {"ratio": 0.25, "reconstruct": False, "batch_num": 3})
    assert old.options.refit is False and old.options.calib_batches == 3
    new = make_pass("prune_channels", {"ratio": 0.25, "refit": False, "calib_batches": 3})
    assert old.options == new.options
    with pytest.warns(DeprecationWarning), pytest.raises(RecipeError, match="both 'batch_num'.*'calib_batches'"):
        make_pass("quantize", {"batch_num": 2, "calib_batches": 2})
    with pytest.warns(DeprecationWarning):
        recipe = recipe_from_data({"passes": [{"pass": "decompose_conv", "batch_num": 4}]})
    assert recipe.passes[0].options.calib_batches == 4
    assert "batch_num" not in recipe.to_data()["passes"][0]  # the resolved recipe uses the new name


def test_renamed_api_keywords_give_the_same_model() -> None:
    new = sparsify(DEMO, ratio=0.25, refit=False).model
    with pytest.warns(DeprecationWarning, match="'prune_ratio' is deprecated"):
        old = sparsify(DEMO, prune_ratio=0.25, reconstruct=False).model
    assert old.SerializeToString(deterministic=True) == new.SerializeToString(deterministic=True)
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="both 'prune_ratio'"):
        sparsify(DEMO, ratio=0.3, prune_ratio=0.25)


def test_renamed_cli_flags_warn_and_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.onnx"
    assert main(["sparsify", str(DEMO), "-o", str(out), "--prune-ratio", "0.25", "--no-reconstruct", "-q"]) == 0
    err = capsys.readouterr().err
    assert "--prune-ratio is deprecated" in err and "use --ratio" in err and "use --no-refit" in err
    again = tmp_path / "q.onnx"
    assert main(["-q", "sparsify", str(DEMO), "-o", str(again), "--ratio", "0.25", "--no-refit"]) == 0
    assert out.read_bytes() == again.read_bytes()


def test_global_flags_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.onnx"
    assert main(["fuse", str(DEMO), "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""  # --quiet after the subcommand silences the report
    assert main(["fuse", str(DEMO), "-o", str(out)]) == 1  # exists, no --force
    assert main(["fuse", str(DEMO), "-o", str(out), "--force", "--verbose"]) == 0
    assert "wrote" in capsys.readouterr().out


def test_records_are_named_by_feature(tmp_path: Path) -> None:
    out = tmp_path / "d.onnx"
    with pytest.warns(DeprecationWarning, match="'ops' is deprecated.*'layers'"):
        decompose(DEMO, out, ops="conv", rank_rule="rank:16", options={"min_channels": 16})
    record = json.loads((tmp_path / "d.decomposition_record.json").read_text())
    assert record["nodes"], "the demo has decomposable convs at rank 16"
    assert not (tmp_path / "d.decomposition.json").exists()


def test_decompose_skip_matches_node_names(tmp_path: Path) -> None:
    model = onnx.load(DEMO)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    options = {"min_channels": 16, "skip": [convs[-1]]}
    report = decompose(DEMO, rank_rule="rank:16", options=options, fuse=False)
    done = {e["node"] for e in report.result("decompose_conv").data["record"]["nodes"]}
    assert convs[-1] not in done and done, (convs, done)
