"""User passes: the example of docs/writing-a-pass.md, run verbatim through every registration route.

The module source is the ```python block after ``<!-- example-module ... -->`` in the doc; it is
written as ``my_package/passes.py`` under ``tmp_path/src`` and used (a) as ``module:Class`` in a
recipe, (b) through an ``onnxcomp.passes`` entry point of a ``my_package-0.1.dist-info`` on
PYTHONPATH (in a subprocess, since entry points load once per process), (c) by name after
``@register_pass`` ran on import. The registry is copied per test so no user pass leaks out.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp.cli.main import main as cli_main
from onnxcomp.errors import RecipeError
from onnxcomp.framework import Recipe, describe_passes, make_pass, pass_source, recipe_from_data, registry
from onnxcomp.testing import run_model

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "writing-a-pass.md"
SPEC = "my_package.passes:ClipWeights"
SUMMARY = "Clamp the float weights of Conv, Gemm and MatMul nodes to [-max_abs, max_abs]."
OPTION_LINES = [
    "    max_abs (float) = 1.0",
    "    ops (list of 'Conv' | 'Gemm' | 'MatMul') = ('Conv', 'Gemm', 'MatMul')",
    "    skip (list of str) = ()",
]
DECLINED_MM2 = ("mm2", "the weight 'z' of MatMul 'mm2' is not a constant")

# |w| > 0.5: 2.0, -3.0, 0.75 (exactly +-0.5 stays); |w| > 1: 2.0, -3.0
W1 = np.array([[0.1, 2.0, -0.2], [-3.0, 0.3, 0.4], [0.0, 0.75, -0.5], [0.25, -0.45, 0.5]], np.float32)
W2 = np.array([[0.2, -0.9, 0.1], [0.3, 0.1, -0.2], [0.4, 0.0, 0.5]], np.float32)  # |w| > 0.5: -0.9
B2 = np.array([5.0, -6.0, 0.1], np.float32)  # a Gemm bias, not a weight: never clipped


# --- helpers ---------------------------------------------------------------------------------


def doc_block(marker: str) -> str:
    """The fenced python block right after the ``<!-- marker ... -->`` comment of the doc."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(rf"^<!-- {re.escape(marker)}\b[^\n]*-->\n```python\n(.*?)^```$", text, re.S | re.M)
    assert found, f"{DOC}: no ```python block right after <!-- {marker} ... -->"
    return found.group(1)


def write_package(src: Path) -> Path:
    pkg = src / "my_package"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "passes.py").write_text(doc_block("example-module"), encoding="utf-8")
    return src


def write_dist_info(src: Path, dist: str, entry_points: dict[str, str]) -> None:
    """An installed distribution as importlib.metadata sees it: NAME-VERSION.dist-info on sys.path."""
    info = src / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n", encoding="utf-8")
    lines = ["[onnxcomp.passes]", *(f"{name} = {value}" for name, value in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def clip_model() -> onnx.ModelProto:
    """x[2,4] -MatMul(W1)-> Gemm(W2, B2) -MatMul(z)-> y, and W1 itself as output w1_out (a second reader)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Gemm", ["h", "w2", "b2"], ["g"], name="fc"),
            helper.make_node("MatMul", ["g", "z"], ["y"], name="mm2"),
            helper.make_node("Identity", ["w1"], ["w1_out"], name="keep"),
        ],
        "clip",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2]),
            helper.make_tensor_value_info("w1_out", TensorProto.FLOAT, [4, 3]),
        ],
        [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2"), numpy_helper.from_array(B2, "b2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def save_model(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(clip_model(), str(path))
    return path


def node_inputs(model: onnx.ModelProto) -> dict[str, list[np.ndarray | None]]:
    """Per node name, the value of each input (None for a non-initializer)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: [inits.get(i) for i in n.input] for n in model.graph.node}


def assert_clipped(model: onnx.ModelProto, max_abs: float) -> None:
    """Weights clipped exactly, the bias and the second reader of w1 untouched, outputs as numpy says."""
    inputs = node_inputs(model)
    np.testing.assert_array_equal(inputs["mm1"][1], np.clip(W1, -max_abs, max_abs))
    np.testing.assert_array_equal(inputs["fc"][1], np.clip(W2, -max_abs, max_abs))
    np.testing.assert_array_equal(inputs["fc"][2], B2)
    assert inputs["mm2"][1] is None  # z: still the graph input
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((2, 4)).astype(np.float32), "z": rng.standard_normal((3, 2)).astype(np.float32)}
    y, w1_out = run_model(model, feeds)
    h = feeds["x"].astype(np.float64) @ np.clip(W1, -max_abs, max_abs)
    want = (h @ np.clip(W2, -max_abs, max_abs) + B2) @ feeds["z"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(w1_out, W1)  # the Identity reads the original, unclipped w1


def run_cli(args: list[str], src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m onnxcomp ARGS`` in a fresh process with ``src`` on PYTHONPATH."""
    paths = [str(src), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run(
        [sys.executable, "-m", "onnxcomp", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def forget_my_package() -> None:
    for module in [m for m in sys.modules if m == "my_package" or m.startswith("my_package.")]:
        del sys.modules[module]


@pytest.fixture
def user_src(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The doc's package under tmp_path/src, importable; a private copy of the pass registry."""
    registry.available_passes()  # built-ins and entry points go into the real registry first
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    src = write_package(tmp_path / "src")
    forget_my_package()
    monkeypatch.syspath_prepend(str(src))
    yield src
    forget_my_package()


# --- (a) module:Class in a recipe, through onnxcomp.compress --------------------------------


def test_module_class_recipe_clips_and_replays(user_src: Path, tmp_path: Path) -> None:
    model_path = save_model(tmp_path)
    before = model_path.read_bytes()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[[passes]]\npass = "{SPEC}"\nmax_abs = 0.5\n', encoding="utf-8")
    out = tmp_path / "out.onnx"

    report = onnxcomp.compress(model_path, recipe, out)

    result = report.result("clip_weights")
    assert result.modified
    assert result.stats == {"weights": 2, "values": 4}
    assert result.changed == ["mm1", "fc"]
    assert result.declined == [DECLINED_MM2]
    assert result.summary() == "weights=2, values=4, declined=1"
    assert model_path.read_bytes() == before  # the input model is never modified
    saved = onnx.load(str(out))
    assert_clipped(saved, 0.5)
    assert_clipped(report.model, 0.5)

    resolved = tmp_path / "out.recipe.toml"
    data = tomllib.loads(resolved.read_text(encoding="utf-8"))
    assert data["passes"] == [{"pass": SPEC, "max_abs": 0.5, "ops": ["Conv", "Gemm", "MatMul"], "skip": []}]
    assert data["seed"] == 0 and data["validate"] == "each"
    assert data["meta"]["input"] == "model.onnx"

    out2 = tmp_path / "out2.onnx"
    replay = onnxcomp.compress(model_path, resolved, out2)
    assert replay.result("clip_weights").stats == {"weights": 2, "values": 4}
    assert out2.read_bytes() == out.read_bytes()

    again = onnxcomp.compress(saved, [SPEC])  # already within 1.0 after clipping to 0.5: nothing to do
    assert not again.result("clip_weights").modified
    assert again.result("clip_weights").stats == {"weights": 0, "values": 0}


def test_options_are_typed_and_skip_works(user_src: Path) -> None:
    model = clip_model()
    report = onnxcomp.compress(model, [make_pass(SPEC, {"max_abs": 0.5, "ops": ["Gemm", "MatMul"], "skip": ["f*"]})])
    result = report.result("clip_weights")
    assert result.stats == {"weights": 1, "values": 3}
    assert result.changed == ["mm1"]
    inputs = node_inputs(report.model)
    np.testing.assert_array_equal(inputs["fc"][1], W2)  # skipped by the glob

    only_gemm = onnxcomp.compress(model, [make_pass(SPEC, {"max_abs": 0.5, "ops": ["Gemm"]})])
    assert only_gemm.result("clip_weights").stats == {"weights": 1, "values": 1}
    assert only_gemm.result("clip_weights").declined == []  # MatMuls not selected: not declined either


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_abs": 0}, f"recipe: passes[0] ({SPEC}): max_abs must be > 0, got 0.0"),
        ({"max_abs": "big"}, f"recipe: passes[0] ({SPEC}).max_abs: expected a number, got 'big'"),
        (
            {"max_ab": 0.5},
            f"recipe: passes[0] ({SPEC}): unknown option 'max_ab' (did you mean 'max_abs'?); "
            "valid options: max_abs, ops, skip",
        ),
        (
            {"ops": ["Conv", "Relu"]},
            f"recipe: passes[0] ({SPEC}).ops[1]: 'Relu' is not one of 'Conv', 'Gemm', 'MatMul'",
        ),
    ],
)
def test_bad_options_are_one_line_recipe_errors(user_src: Path, options: dict, message: str) -> None:
    with pytest.raises(RecipeError) as exc:
        recipe_from_data({"passes": [{"pass": SPEC, **options}]})
    assert str(exc.value) == message


# --- (c) @register_pass when the module is imported ------------------------------------------


def test_register_pass_on_import(user_src: Path) -> None:
    assert "clip_weights" not in registry._REGISTRY
    import my_package.passes  # noqa: F401 - registers clip_weights

    assert pass_source("clip_weights") == SPEC
    described = {name: (source, summary, options) for name, source, summary, options in describe_passes()}
    assert described["clip_weights"] == (
        SPEC,
        SUMMARY,
        [
            ("max_abs", "float", 1.0),
            ("ops", "list of 'Conv' | 'Gemm' | 'MatMul'", ("Conv", "Gemm", "MatMul")),
            ("skip", "list of str", ()),
        ],
    )
    report = onnxcomp.compress(clip_model(), ["remove_identity", "clip_weights"])
    result = report.result("clip_weights")
    assert result.stats == {"weights": 1, "values": 2}  # default max_abs 1.0: 2.0 and -3.0 of W1
    assert result.declined == [DECLINED_MM2]
    assert_clipped(report.model, 1.0)
    # not an entry point: the resolved recipe must name it so that another process can import it
    assert Recipe([make_pass("clip_weights")]).to_data()["passes"][0]["pass"] == SPEC


def test_doc_example_test_runs(user_src: Path) -> None:
    namespace: dict = {}
    exec(compile(doc_block("example-test"), f"{DOC}:example-test", "exec"), namespace)  # noqa: S102
    namespace["test_clip_weights"]()


# --- (b) an installed entry point, in a fresh process ----------------------------------------


def test_entry_point_is_listed_and_runs_by_name(tmp_path: Path) -> None:
    src = write_package(tmp_path / "src")
    write_dist_info(src, "my_package", {"clip_weights": SPEC})
    model_path = save_model(tmp_path)
    before = model_path.read_bytes()

    listed = run_cli(["passes"], src, tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    head = f"clip_weights [entry point clip_weights ({SPEC})]: {SUMMARY}"
    assert head in lines, listed.stdout
    at = lines.index(head)
    assert lines[at + 1 : at + 4] == OPTION_LINES
    assert "[not loaded]" not in listed.stdout
    assert "remove_identity: " in listed.stdout  # built-ins still listed, without a source

    (tmp_path / "recipe.toml").write_text('[[passes]]\npass = "clip_weights"\nmax_abs = 0.5\n', encoding="utf-8")
    ran = run_cli(["run", "recipe.toml", "model.onnx", "-o", "out.onnx", "--verbose"], src, tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert re.search(
        r"^  clip_weights  changed    weights=2, values=4, declined=1  \(\d+\.\d\ds\)$", ran.stdout, re.M
    ), ran.stdout
    assert f"      declined {DECLINED_MM2[0]}: {DECLINED_MM2[1]}" in ran.stdout.splitlines()
    assert_clipped(onnx.load(str(tmp_path / "out.onnx")), 0.5)
    resolved = tomllib.loads((tmp_path / "out.recipe.toml").read_text(encoding="utf-8"))
    assert resolved["passes"][0]["pass"] == "clip_weights"  # an entry point: found by name anywhere
    assert model_path.read_bytes() == before


def test_broken_entry_points_do_not_break_other_commands(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "broken_pkg").mkdir(parents=True)
    (src / "broken_pkg" / "__init__.py").write_text(
        'raise RuntimeError("broken_pkg needs a licence key")\n', encoding="utf-8"
    )
    write_dist_info(
        src, "broken_pkg", {"broken_pass": "broken_pkg:BrokenPass", "not_a_pass": "onnxcomp.framework:PassResult"}
    )
    save_model(tmp_path)

    listed = run_cli(["passes"], src, tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert (
        "broken_pass [not loaded]: entry point broken_pass (broken_pkg:BrokenPass): broken_pkg needs a licence key"
        in lines
    )
    not_a_pass = [line for line in lines if line.startswith("not_a_pass [not loaded]: ")]
    assert len(not_a_pass) == 1, listed.stdout
    assert not_a_pass[0].startswith("not_a_pass [not loaded]: entry point not_a_pass (onnxcomp.framework:PassResult): ")
    assert not_a_pass[0].endswith(": <class 'onnxcomp.framework.base.PassResult'> is not a subclass of onnxcomp.Pass")
    listed_names = {line.split(":")[0] for line in lines if not line.startswith(" ") and "[not loaded]" not in line}
    assert listed_names == {name for name in registry.available_passes() if pass_source(name) == "built-in"}
    assert len(listed_names) >= 12

    (tmp_path / "recipe.toml").write_text('[[passes]]\npass = "remove_identity"\n', encoding="utf-8")
    ran = run_cli(["run", "recipe.toml", "model.onnx", "-o", "out.onnx"], src, tmp_path)
    assert ran.returncode == 0, ran.stderr
    # the Identity reads a constant that is a graph output: declined, so the model is unchanged
    assert re.search(r"^  remove_identity  no change  identity=0, dropout=0, declined=1  \(", ran.stdout, re.M), (
        ran.stdout
    )
    assert_clipped(onnx.load(str(tmp_path / "out.onnx")), np.inf)  # clipping to inf: the original model
    inspected = run_cli(["inspect", "model.onnx", "--json"], src, tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    summary = json.loads(inspected.stdout)
    assert summary["ops"] == {"MatMul": 2, "Gemm": 1, "Identity": 1}
    assert summary["params_by_dtype"]["float"]["count"] == W1.size + W2.size + B2.size


# --- errors naming the spec ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (
            "nonexistent.module:Cls",
            "cannot import module 'nonexistent.module' (No module named 'nonexistent'); is it installed or on PYTHONPATH?",
        ),
        ("onnxcomp.passes.quantize:NotAClass", "module 'onnxcomp.passes.quantize' has no attribute 'NotAClass'"),
        (
            "onnxcomp.framework:PassResult",
            "<class 'onnxcomp.framework.base.PassResult'> is not a subclass of onnxcomp.Pass",
        ),
        ("my_package.passes:", "write an importable pass as 'package.module:ClassName'"),
    ],
)
def test_bad_pass_specs_are_one_line_recipe_errors(spec: str, reason: str) -> None:
    with pytest.raises(RecipeError) as exc:
        recipe_from_data({"passes": [{"pass": spec}]})
    message = str(exc.value)
    assert "\n" not in message
    assert message == f"recipe: passes[0]: pass {spec!r}: {reason}"


def test_cli_reports_a_bad_spec_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path = save_model(tmp_path)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[passes]]\npass = "nonexistent.module:Cls"\n', encoding="utf-8")
    code = cli_main(["run", str(recipe), str(model_path), "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == [
        f"onnxcomp: error: {recipe}: passes[0]: pass 'nonexistent.module:Cls': cannot import module "
        "'nonexistent.module' (No module named 'nonexistent'); is it installed or on PYTHONPATH?"
    ]
    assert not (tmp_path / "out.onnx").exists()


# --- framework edge cases found while writing the walkthrough ------------------------------


def test_module_raising_on_import_is_a_recipe_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "raising_mod.py").write_text('raise RuntimeError("needs a licence key")\n', encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "raising_mod", raising=False)
    with pytest.raises(RecipeError, match=r"pass 'raising_mod:P'.*needs a licence key"):
        recipe_from_data({"passes": [{"pass": "raising_mod:P"}]})


def test_module_class_cannot_take_a_builtin_name(tmp_path: Path) -> None:
    (tmp_path / "collide.py").write_text(
        "from onnxcomp.framework import Pass, PassResult\n\n\n"
        'class Q(Pass):\n    """Collides."""\n\n    name = "quantize"\n\n'
        "    def run(self, graph, ctx):\n        return PassResult(False)\n",
        encoding="utf-8",
    )
    script = (
        "from onnxcomp.errors import RecipeError\n"
        "from onnxcomp.framework import available_passes, recipe_from_data\n"
        "try:\n"
        "    recipe_from_data({'passes': [{'pass': 'collide:Q'}]})\n"
        "except RecipeError as exc:\n"
        "    print('RecipeError:', exc)\n"
        "print(available_passes()['quantize'].__module__)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]
    assert done.stdout.splitlines() == [
        "RecipeError: recipe: passes[0]: pass name 'quantize' of collide:Q is already taken by built-in; rename one of them",
        "onnxcomp.passes.quantize",
    ]


def test_rejected_entry_point_is_named_once(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.available_passes()  # the real registry is loaded; the reload below works on copies
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "_loaded", False)
    fake = [importlib.metadata.EntryPoint("not_a_pass", "onnxcomp.framework:PassResult", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group=None: fake if group == registry.ENTRY_POINT_GROUP else []
    )
    assert registry.broken_passes() == {
        "not_a_pass": "entry point not_a_pass (onnxcomp.framework:PassResult): "
        "<class 'onnxcomp.framework.base.PassResult'> is not a subclass of onnxcomp.Pass"
    }
