"""The code's layers import in one direction: `mindbridge/` (plain torch + transformers: the core and
the methods) under `data/`'s datamodule users, `lit_modules/` (Lightning and the stage jobs) above
both, `train.py` on top; methods are peers that never import each other; nothing imports in a circle
(imports inside functions count)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mindbridge", "lit_modules", "data", "reporting")
# Each method's own modules: a method may import its own and the core, never another method's.
METHODS = {
    "mindbridge.neuraldb": "neuraldb", "mindbridge.wise": "wise",
    "mindbridge.unike": "unike", "mindbridge.unike_modules": "unike", "mindbridge.unike_mm": "unike",
    "lit_modules.neuraldb": "neuraldb", "lit_modules.wise": "wise", "lit_modules.unike": "unike",
}
# The one upward arrow left: UniKE's multimodal path reads MMEdit records from data/.
KNOWN_UPWARD = {("mindbridge.unike_mm", "data.mmedit"), ("mindbridge.unike_mm", "data.records")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    files["train"] = ROOT / "train.py"
    modules = set(files)
    return {m: _imports(p, modules) - {m} for m, p in files.items()}


def test_nothing_imports_in_a_circle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if dep.endswith("__init__") or dep in PACKAGES:
                continue                                  # a package's __init__ re-exports its modules
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if not state.get(dep):
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)


def test_the_core_and_the_methods_import_nothing_above_them(graph):
    upward = {(m, d) for m, deps in graph.items() if m.startswith("mindbridge")
              for d in deps if d.split(".")[0] in ("lit_modules", "data", "reporting", "train")}
    assert upward <= KNOWN_UPWARD, sorted(upward - KNOWN_UPWARD)


def test_methods_are_peers_that_never_import_each_other(graph):
    crossing = {(m, d) for m, deps in graph.items() if m in METHODS
                for d in deps if d in METHODS and METHODS[d] != METHODS[m]}
    assert not crossing, sorted(crossing)


def test_the_shared_runtime_imports_no_stage(graph):
    stages = {"lit_modules.stages", "lit_modules.registry", *[m for m in METHODS if m.startswith("lit_modules")]}
    for shared in ("lit_modules.runtime", "lit_modules.editing"):
        assert not graph[shared] & stages, (shared, sorted(graph[shared] & stages))
    # Only the entry point reads the registry; the stage jobs never import it back.
    assert {m for m, deps in graph.items() if "lit_modules.registry" in deps} == {"train"}
