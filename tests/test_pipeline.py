"""Pass manager, registry, typed options and TOML recipes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import pytest
from conftest import conv_bn_model

import onnxcomp.framework.manager as manager
from onnxcomp import ir
from onnxcomp.api import compress, quantize
from onnxcomp.cli.main import main
from onnxcomp.errors import ConfigError, PassError, RecipeError
from onnxcomp.framework.base import Pass, PassContext, PassResult
from onnxcomp.framework.manager import PassManager
from onnxcomp.framework.options import build_options
from onnxcomp.framework.recipe import dump_recipe, load_recipe, recipe_from_data
from onnxcomp.framework.registry import make_pass
from onnxcomp.testing import op_counts, random_feeds, run_model


class BreakGraph(Pass):
    """Test pass: gives the Conv an int64 weight (a type error: an invalid model)."""

    name = "break_graph"

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        node = next(ir.iter_nodes(graph, ("Conv",)))
        node.inputs[1] = ir.make_constant("int_weight", np.ones((8, 3, 3, 3), np.int64))
        return PassResult(modified=True)


class NeedsOpset21(Pass):
    name = "needs_opset_21"

    def min_opset(self) -> int | None:
        return 21

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        return PassResult(modified=False)


@pytest.mark.parametrize("validate", ["each", "locate"])
def test_failing_pass_is_named(validate: str) -> None:
    """``locate`` validates once, then replays the pipeline to name the pass that broke the model."""
    with pytest.raises(
        PassError, match=r"pass 'break_graph' \(step 2 of 3\) produced an invalid model \(after remove_identity\)"
    ):
        passes = [make_pass("remove_identity"), BreakGraph(), make_pass("dedupe_initializers")]
        PassManager(passes, validate=validate).run(conv_bn_model())


def test_locate_validates_once_when_the_model_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = manager.validate_model
    monkeypatch.setattr(manager, "validate_model", lambda m, **kw: calls.append(1) or real(m, **kw))
    passes = [make_pass("remove_identity"), make_pass("fold_batchnorm"), make_pass("dedupe_initializers")]
    PassManager(passes, validate="locate").run(conv_bn_model())
    each = len(calls)
    calls.clear()
    PassManager(passes, validate="each").run(conv_bn_model())
    assert each == 1 and len(calls) >= 2


def test_exception_in_pass_is_named() -> None:
    class Boom(Pass):
        name = "boom"

        def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
            raise ZeroDivisionError("x")

    with pytest.raises(PassError, match=r"pass 'boom' \(step 1 of 1\) failed with ZeroDivisionError"):
        PassManager([Boom()]).run(conv_bn_model())


def test_opset_upgrade_for_pass_is_reported() -> None:
    report = PassManager([NeedsOpset21()]).run(conv_bn_model(opset=17))
    assert report.model.opset_import[0].version == 21
    assert report.notes == ["converted opset 17 -> 21 for needs_opset_21"]
    feeds = random_feeds(report.model)
    np.testing.assert_allclose(run_model(report.model, feeds)[0], run_model(conv_bn_model(), feeds)[0], rtol=1e-6)


def test_caller_model_untouched() -> None:
    model = conv_bn_model()
    before = model.SerializeToString()
    PassManager([make_pass("remove_identity")]).run(model)
    assert model.SerializeToString() == before


def test_unknown_pass_lists_valid() -> None:
    with pytest.raises(
        RecipeError,
        match=r"unknown pass 'remove_identit' \(did you mean 'remove_identity'\?\); valid passes: .*remove_identity",
    ):
        recipe_from_data({"passes": [{"pass": "remove_identit"}]})


def test_unknown_option_lists_valid() -> None:
    with pytest.raises(
        RecipeError, match=r"unknown option 'dropuot' \(did you mean 'dropout'\?\); valid options: dropout"
    ):
        recipe_from_data({"passes": [{"pass": "remove_identity", "dropuot": False}]})


def test_bad_option_type() -> None:
    with pytest.raises(RecipeError, match=r"remove_identity.*dropout: expected true or false, got 'yes'"):
        recipe_from_data({"passes": [{"pass": "remove_identity", "dropout": "yes"}]})


def test_recipe_top_level_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no passes"):
        recipe_from_data({})
    with pytest.raises(RecipeError, match="unknown top-level key 'pases'"):
        recipe_from_data({"pases": []})
    bad = tmp_path / "bad.toml"
    bad.write_text("[[passes]\n")
    with pytest.raises(RecipeError, match="bad.toml: not valid TOML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "none.toml")


def test_typed_options() -> None:
    @dataclass(frozen=True)
    class Opts:
        mode: Literal["a", "b"] = "a"
        ratio: float = 0.5
        names: tuple[str, ...] = ()
        limit: int | None = None

    opts = build_options(Opts, {"mode": "b", "ratio": 1, "names": ["x", "y"], "limit": 3}, "p")
    assert opts == Opts("b", 1.0, ("x", "y"), 3)
    with pytest.raises(RecipeError, match=r"p.mode: 'c' is not one of 'a', 'b'"):
        build_options(Opts, {"mode": "c"}, "p")
    with pytest.raises(RecipeError, match="p.limit: expected int | none"):
        build_options(Opts, {"limit": "3"}, "p")
    with pytest.raises(RecipeError, match=r"p.names\[1\]: expected a string"):
        build_options(Opts, {"names": ["x", 2]}, "p")


def test_resolved_recipe_reproduces_run(tmp_path: Path, conv_bn_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('seed = 3\n[[passes]]\npass = "remove_identity"\n')
    out1 = tmp_path / "a.onnx"
    assert main(["-q", "run", str(recipe), str(conv_bn_path), "-o", str(out1)]) == 0
    resolved = tmp_path / "a.recipe.toml"
    text = resolved.read_text()
    assert "dropout = true" in text and "seed = 3" in text
    assert f'input_sha256 = "{hashlib.sha256(conv_bn_path.read_bytes()).hexdigest()}"' in text  # hashed meanwhile
    again = load_recipe(resolved)
    assert again.to_data() == load_recipe(recipe).to_data()
    out2 = tmp_path / "b.onnx"
    assert main(["-q", "run", str(resolved), str(conv_bn_path), "-o", str(out2)]) == 0
    assert out1.read_bytes() == out2.read_bytes()
    assert "Identity" not in op_counts(onnx.load(str(out2)))


def test_dump_recipe_roundtrip_values() -> None:
    recipe = recipe_from_data({"seed": 7, "validate": "end", "passes": [{"pass": "remove_identity", "dropout": False}]})
    text = dump_recipe(recipe, {"note": 'quote " and \\ back', "ratio": 1e-5, "list": [1, 2]})
    import tomllib

    data = tomllib.loads(text)
    assert data["meta"] == {"note": 'quote " and \\ back', "ratio": 1e-5, "list": [1, 2]}
    assert recipe_from_data(data).to_data() == recipe.to_data()


def test_api_and_cli_agree(tmp_path: Path, conv_bn_path: Path) -> None:
    out_api = tmp_path / "api.onnx"
    compress(conv_bn_path, ["remove_identity"], out_api)
    out_cli = tmp_path / "cli.onnx"
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\npass = "remove_identity"\n')
    assert main(["-q", "run", str(recipe), str(conv_bn_path), "-o", str(out_cli)]) == 0
    assert out_api.read_bytes() == out_cli.read_bytes()


def test_validate_none_skips_every_check_and_writes_the_same_bytes(
    tmp_path: Path, conv_bn_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--validate none`` (``validate="none"``): no checker, no reference run, no session over the
    output; the model is byte for byte the checked run's, and its recipe records the mode."""
    checked = tmp_path / "checked.onnx"
    quantize(conv_bn_path, checked, weights="int8", activations="none")
    calls: list[str] = []
    monkeypatch.setattr(manager, "validate_model", lambda *a, **k: calls.append("validate_model"))
    monkeypatch.setattr(manager, "inference_sample", lambda *a, **k: calls.append("inference_sample"))
    unchecked = tmp_path / "unchecked.onnx"
    argv = ["-q", "quantize", str(conv_bn_path), "-o", str(unchecked), "--weights", "int8", "--activations", "none"]
    assert main([*argv, "--validate", "none"]) == 0
    assert calls == [] and unchecked.read_bytes() == checked.read_bytes()
    assert 'validate = "none"' in (tmp_path / "unchecked.recipe.toml").read_text()
    assert 'validate = "locate"' in (tmp_path / "checked.recipe.toml").read_text()
    again = tmp_path / "again.onnx"  # the recipe written reproduces the unchecked run
    assert main(["-q", "run", str(tmp_path / "unchecked.recipe.toml"), str(conv_bn_path), "-o", str(again)]) == 0
    assert calls == [] and again.read_bytes() == checked.read_bytes()


def test_validate_run_option_overrides_the_recipe_and_is_checked(tmp_path: Path, conv_bn_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('validate = "none"\n[[passes]]\npass = "remove_identity"\n')
    out = tmp_path / "out.onnx"
    compress(conv_bn_path, recipe, out, validate="each")
    assert 'validate = "each"' in (tmp_path / "out.recipe.toml").read_text()
    with pytest.raises(ConfigError, match=r"validate must be one of each, locate, end, none, got 'never'"):
        compress(conv_bn_path, recipe, tmp_path / "bad.onnx", validate="never")
    assert not (tmp_path / "bad.onnx").exists()
    with pytest.raises(SystemExit):
        main(["-q", "fuse", str(conv_bn_path), "-o", str(tmp_path / "cli.onnx"), "--validate", "never"])


def test_passes_command_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "remove_identity:" in out and "dropout (bool) = True" in out
