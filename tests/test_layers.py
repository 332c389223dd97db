"""The package's layers import downward only (docs/ARCHITECTURE.md), with no cycle and no hidden import.

An AST walk over ``onnxcomp/`` collects every import of an onnxcomp module, at module level and
inside functions. It fails on an import against the layer order, on an import between the feature
libraries (``fusion``, ``quant``, ``sparsity``, ``decomposition``), on a function-level import of
an onnxcomp module, and on any cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnxcomp"

#: Bottom to top. A module may import modules of its own layer entry or of any lower one.
LAYERS: list[tuple[str, ...]] = [
    ("_version", "errors", "progress", "blas", "formats"),
    ("ir",),
    ("runtime",),
    ("model_io",),
    ("framework",),
    ("calibration",),
    ("analysis", "testing"),
    ("fusion", "quant", "sparsity", "decomposition"),
    ("passes",),
    ("flags",),
    ("execute",),  # running a recipe and saving its outputs: the path behind every API function
    ("qat",),  # the optional training engine (torch): above the passes it runs, below the front ends
    ("api",),
    ("cli", "__main__", "__init__"),
]
#: Siblings of one layer that may not import each other (each is a library of its own).
INDEPENDENT = {"fusion", "quant", "sparsity", "decomposition"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _top(module: str) -> str:
    """The layer entry of ``onnxcomp.x.y`` (``x``); the package itself is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _rank(entry: str) -> int:
    for i, layer in enumerate(LAYERS):
        if entry in layer:
            return i
    raise AssertionError(f"onnxcomp/{entry} is in no layer: add it to LAYERS in {__file__} and docs/ARCHITECTURE.md")


def _imports(modules: set[str]) -> list[tuple[str, str, int, bool]]:
    """(importer, imported module, line, inside a function) for every onnxcomp import."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import mod` imports the submodule; `from mod import name` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                if target == "onnxcomp" or target.startswith("onnxcomp."):
                    found.append((name, target, node.lineno, id(node) in nested))
    return found


MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}
IMPORTS = _imports(MODULES)


def test_every_module_is_in_a_layer() -> None:
    for module in sorted(MODULES):
        _rank(_top(module))


def test_imports_point_down() -> None:
    upward = []
    for importer, imported, line, _ in IMPORTS:
        src, dst = _top(importer), _top(imported)
        if src == dst:
            continue
        if _rank(dst) > _rank(src):
            upward.append(f"{importer}:{line} imports {imported} (layer {dst} is above {src})")
        elif src in INDEPENDENT and dst in INDEPENDENT:
            upward.append(f"{importer}:{line} imports {imported} (feature libraries never import each other)")
    assert not upward, "\n".join(upward)


def test_no_function_level_imports() -> None:
    hidden = [
        f"{importer}:{line} imports {imported} inside a function"
        for importer, imported, line, inside in IMPORTS
        if inside
    ]
    assert not hidden, "\n".join(hidden)


def test_no_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for importer, imported, _, _ in IMPORTS:
        target = imported if imported in MODULES else imported.rpartition(".")[0]
        if target in MODULES and target != importer:
            graph[importer].add(target)
    # a package's __init__ re-exporting its own submodules is not a cycle with them
    for module in MODULES:
        graph[module] = {t for t in graph[module] if not (module.startswith(t + ".") and t != "onnxcomp")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)


def test_the_walk_sees_imports() -> None:
    """The walk is not vacuous: it finds the pass modules importing the framework."""
    assert any(i == "onnxcomp.passes.quantize" and t.startswith("onnxcomp.framework") for i, t, _, _ in IMPORTS)
    assert _rank("cli") > _rank("api") > _rank("qat") > _rank("flags") > _rank("passes")
    assert _rank("api") > _rank("passes") > _rank("quant") > _rank("ir")
