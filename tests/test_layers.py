"""pipeline/'s layers (pipeline.core.layers): every import, those inside functions too, goes to
the module's own layer or one below it, and every module sits in a layer; cluster/ holds the Ray
code and only that; no two modules share a file name; imports sit at the top of each module,
but for the libraries a stage loads only where it uses them (`LAZY_LIBRARIES`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.layers import (LAYERS, LAZY_IN_CORE, LAZY_LIBRARIES, PACKAGE, layer_files,
                                  source_digest)

MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)
STAGES = PACKAGE.parent / "stages"


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
                      "import pipeline.jobs.sample_job\nfrom pipeline.core import io\n")
    assert pipeline_imports(module) == [(2, "pipeline.reporting.tables"),
                                        (3, "pipeline.jobs.sample_job"), (4, "pipeline.core.io")]


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


def imports_inside_functions(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, enclosing function) of every import made inside a function."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        scope = parents[node]
        while not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
            scope = parents[scope]
        if isinstance(scope, ast.Module):  # module level, `if TYPE_CHECKING:` blocks too
            continue
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or "."])
        found += [(node.lineno, name, scope.name) for name in names]
    return sorted(found)


def imports_ray(path: Path) -> bool:
    return any(name == "ray" or name.startswith("ray.")
               for node in ast.walk(ast.parse(path.read_text()))
               for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                            [node.module or ""] if isinstance(node, ast.ImportFrom) else []))


def test_cluster_holds_the_ray_code_and_only_that():
    cluster = [p for p in MODULES if p.parent.name == "cluster" and p.name != "__init__.py"]
    without = [p.name for p in cluster if not imports_ray(p)]
    assert cluster and not without, f"modules in pipeline/cluster/ that do not use Ray: {without}"
    elsewhere = [str(p.relative_to(PACKAGE.parent)) for p in MODULES
                 if p.parent.name != "cluster" and imports_ray(p)]
    assert not elsewhere, f"modules outside pipeline/cluster/ that import Ray: {elsewhere}"


def test_no_two_modules_share_a_file_name():
    names: dict[str, list[str]] = {}
    for path in [*MODULES, *STAGES.glob("*.py")]:
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(str(path.relative_to(PACKAGE.parent)))
    assert not {n: p for n, p in names.items() if len(p) > 1}


def top_level_imports(path: Path) -> set[str]:
    """The modules `path` imports at its top (not inside a function)."""
    inside = {(line, name) for line, name, _ in imports_inside_functions(path)}
    return {name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""]) if (node.lineno, name) not in inside}


# Our modules that load a lazy library as they are imported: imported where used, like it.
LAZY_MODULES = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in MODULES
                if any(m.split(".")[0] in LAZY_LIBRARIES for m in top_level_imports(p))}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_a_module_imports_at_its_top_but_the_libraries_loaded_where_used(path):
    allowed = LAZY_LIBRARIES + (LAZY_IN_CORE if path.parent.name == "core" else ())
    if path == PACKAGE / "__init__.py":
        return  # its public API loads on first use (PEP 562): `import pipeline` stays light
    late = [f"line {line}: {name} (in {function})"
            for line, name, function in imports_inside_functions(path)
            if name.split(".")[0] not in allowed and name not in LAZY_MODULES]
    assert not late, f"{path.relative_to(PACKAGE.parent)}: imports inside functions: {late}"


HEAVY = ("ray", "mlflow", "torch_fidelity", "torchvision", "sklearn", "scipy", "matplotlib")


@pytest.mark.parametrize("module", ["pipeline.measure.chunks", "pipeline.cluster.ray_data",
                                    "pipeline.training.loop", "pipeline.jobs.sample_job",
                                    "pipeline.jobs.train_job"])
def test_what_a_worker_unpickles_loads_no_heavy_library(module):
    """A Ray worker imports the module of its task as it unpickles it: sampling and training
    workers load torch and our code, not the extractors', plots' or data readers' libraries
    (each a second or more, paid by every worker process)."""
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]", (module, out)


@pytest.mark.parametrize("path", sorted(STAGES.glob("*.py")), ids=lambda p: p.name)
def test_a_stage_loads_its_job_in_one_block_once_its_params_are_checked(path):
    """A stage imports the library's modules inside `body`, which `_common.run` calls with the
    checked params, and nowhere else inside a function."""
    late = [f"line {line}: {name} (in {function})"
            for line, name, function in imports_inside_functions(path)
            if name.split(".")[0] not in LAZY_LIBRARIES and function != "body"]
    assert not late, f"stages/{path.name}: {late}"


def test_the_stages_start_without_torch_ray_or_mlflow():
    """What every stage imports before its params are checked (stages._common, pipeline.core)
    loads none of the heavy libraries: a refused params.yaml is refused in a fraction of a
    second."""
    code = ("import sys, importlib, pathlib\n"
            "import stages._common\n"
            "for p in sorted(pathlib.Path('pipeline/core').glob('*.py')):\n"
            "    importlib.import_module('pipeline.core.' + p.stem)\n"
            "for stage in sorted(pathlib.Path('stages').glob('*.py')):\n"
            "    importlib.import_module('stages.' + stage.stem)\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pandas', 'torch_fidelity')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_checks_see_an_import_inside_a_function_and_a_module_without_ray(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nif os:\n    import json\n\n\ndef f():\n"
                      "    if os:\n        from pipeline.core import io\n    import ray\n")
    assert imports_inside_functions(module) == [(8, "pipeline.core", "f"), (9, "ray", "f")]
    assert imports_ray(module)
    module.write_text("def f():\n    from rayleigh import x\n")
    assert not imports_ray(module)
