"""The package layout is the architecture: each stage imports only the stages below it.

Layers, lowest first (README, "Architecture"). A module may import its own layer and any lower
one, never a higher one, so each stage can be read, tested and replaced on its own; the data
formats and scoring never need torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import densepr

PKG = Path(densepr.__file__).parent
LAYERS = [
    {"errors", "fileio", "progress", "machine", "ranking", "stages"},  # core: no densepr imports above it
    {"data"},
    {"models"},
    {"index"},
    {"retrieve"},
    {"evaluate"},
    {"train"},
    {"pipeline"},
    {"serve", "reproduce"},
    {"cli", "__main__", "__init__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> list[tuple[str, Path]]:
    return [(str(p.relative_to(PKG).with_suffix("")).replace("/", "."), p) for p in sorted(PKG.rglob("*.py"))]


def _stage(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path, module: str) -> set[str]:
    """Every densepr module this file imports, at any depth (lazy imports inside functions count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                out.add("<relative import>")  # densepr imports itself absolutely, so layers show in every import line
            elif node.module and node.module.startswith("densepr."):
                out.add(node.module[len("densepr."):])
        elif isinstance(node, ast.Import):
            out |= {a.name[len("densepr."):] for a in node.names if a.name.startswith("densepr.")}
    return {m for m in out if m}


def test_every_module_has_a_layer():
    missing = sorted({_stage(m) for m, _ in _modules()} - set(LAYER))
    assert not missing, f"modules outside every layer (add them to LAYERS and the README's package map): {missing}"


@pytest.mark.parametrize("module,path", _modules(), ids=[m for m, _ in _modules()])
def test_no_lower_layer_imports_a_higher_one(module, path):
    mine = LAYER[_stage(module)]
    bad = sorted(m for m in _imports(path, module) if LAYER.get(_stage(m), len(LAYERS)) > mine)
    assert not bad, f"densepr.{module} (layer {mine}) imports higher layers: {bad}"


@pytest.mark.parametrize("stage", ["data", "evaluate"])
def test_formats_and_scoring_do_not_need_torch(stage):
    users = [str(p.relative_to(PKG)) for p in (PKG / stage).rglob("*.py")
             if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "torch" in ast.unparse(n).split()[1].split(".")[0]
                    for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))))]  # fmt: skip
    assert not users, f"{stage}/ imports torch in {users}"


def test_the_layout_test_sees_a_violation(tmp_path):
    """The checker itself: an evaluate module importing train is caught."""
    bad = tmp_path / "x.py"
    bad.write_text("from densepr.train.retriever import train\n")
    assert "train.retriever" in _imports(bad, "evaluate.x")
    assert LAYER["train"] > LAYER["evaluate"]


def test_no_import_cycles():
    """No module imports itself through others (lazy imports count): e.g. models.onnx runs exports the
    reader writes, and never imports models.reader back."""
    mods = dict(_modules())
    name = {m: m.removesuffix(".__init__") for m in mods}
    graph = {name[m]: {i for i in _imports(p, m) if i in name.values() and i != name[m]} for m, p in mods.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return False

    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, f"modules in an import cycle: {cycles}"
