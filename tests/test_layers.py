"""pipeline/'s layers (pipeline.core.layers): every import, those inside functions too, goes to
the module's own layer or one below it, and every module sits in a layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.core.layers import LAYERS, PACKAGE, layer_files, source_digest

MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def pipeline_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a pipeline module in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("pipeline.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pipeline":
                found += [(node.lineno, f"pipeline.{a.name}") for a in node.names]
            elif node.module.startswith("pipeline."):  # `from pipeline.core import io`: the module
                found += [(node.lineno, name) for name in
                          {_submodule(node.module, a.name) for a in node.names}]
    return sorted(found)


def _submodule(package: str, name: str) -> str:
    """`package.name` where that is a module of the project, else `package`."""
    module = f"{package}.{name}"
    return module if (PACKAGE.parent / (module.replace(".", "/") + ".py")).is_file() else package


def layer_of(module: str) -> str:
    return module.split(".")[1]


def test_every_module_sits_in_a_layer():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py"], f"modules outside a layer: {top}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_a_module_imports_only_its_layer_and_those_below(path):
    rank = LAYERS.index(path.parent.name)
    upward = [f"line {line}: {module}" for line, module in pipeline_imports(path)
              if LAYERS.index(layer_of(module)) > rank]
    where = path.relative_to(PACKAGE.parent)
    assert not upward, f"{where} ({LAYERS[rank]}) imports from above: {upward}"


def test_no_two_modules_import_each_other_through_any_path():
    """No circle, lazy imports included (a lazy import used to dodge two)."""
    graph = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts):
             {module for _, module in pipeline_imports(path)} for path in MODULES}

    def reaches(start, goal, seen):
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a]
                      if b in graph and b != a and reaches(b, a, set())})
    assert not circles


def test_the_check_catches_an_import_from_above(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipeline.reporting.tables import to_markdown\n"
                      "import pipeline.jobs.sample\nfrom pipeline.core import io\n")
    assert pipeline_imports(module) == [(2, "pipeline.reporting.tables"),
                                        (3, "pipeline.jobs.sample"), (4, "pipeline.core.io")]


def test_the_source_digest_covers_every_module_of_its_layers(tmp_path):
    files = layer_files("diffusion", "model")
    assert {p.parent.name for p in files} == {"diffusion", "model"}
    assert PACKAGE / "diffusion" / "gaussian.py" in files
    extra = tmp_path / "x.py"
    extra.write_text("a = 1\n")
    first = source_digest(("diffusion",), extra)
    extra.write_text("a = 2\n")
    assert source_digest(("diffusion",), extra) != first
    with pytest.raises(ValueError, match="unknown layers"):
        layer_files("plumbing")
