"""The texts match the code: every module a text names exists, and every attribute it names
is defined there. The texts: params.yaml's comments (and those of docs/*.params.yaml), README.md,
docs/*.md and benchmarks/*.md, and the module docstrings of pipeline/, stages/ and benchmarks/.
The names: file paths
(`pipeline/core/config.py`, `stages/plan.py`, `benchmarks/flops.py`, `tests/test_plan.py`) and
dotted names (`pipeline.core.io`, `pipeline.core.io.torch_load`,
`pipeline.core.tracking.Tracker.live_run`, `stages.submit`). The stages' --seed help is checked
here too: it says what the seed picks in each stage."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
from functools import lru_cache
from pathlib import Path

import pytest

from helpers import PROJECT

PATH = re.compile(r"(?<![\w./-])((?:pipeline|stages|benchmarks|tests)/[\w/]*\w\.py)(?!\w)")
DOTTED = re.compile(r"(?<![\w./-])((?:pipeline|stages|benchmarks)(?:\.[A-Za-z_]\w*)+)")


def references(text: str) -> list[str]:
    """The file paths and dotted names that `text` names, in order."""
    found = [(m.start(), m.group(1)) for m in PATH.finditer(text)]
    found += [(m.start(), m.group(1)) for m in DOTTED.finditer(text)]
    return [ref for _, ref in sorted(found)]


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """The names a module's or a class's body defines: functions, classes, assignments and
    imports, those under `if` / `try` / `with` included."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out[name.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                out[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, block, []):
                    out.update(_names(child.body if isinstance(child, ast.ExceptHandler)
                                      else [child]))
    return out


def _module_file(parts: list[str], root: Path) -> Path | None:
    """The file of module `parts` (a .py file, or a package's __init__.py), or None."""
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def is_broken(ref: str, root: Path = PROJECT) -> bool:
    """True unless `ref` names a file of the project, or a module of it followed by attributes
    the module defines (a class's attributes after the class: `Tracker.live_run`)."""
    if "/" in ref:
        return not (root / ref).is_file()
    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module
        module = _module_file(parts[:cut], root)
        if module is not None:
            break
    else:
        return True
    scope = _tree(module).body
    for attribute in parts[cut:]:
        node = _names(scope).get(attribute)
        if node is None:
            return True
        scope = node.body if isinstance(node, ast.ClassDef) else []
    return False


def _comments(path: Path) -> str:
    return "\n".join(line.partition("#")[2] for line in path.read_text().splitlines()
                     if "#" in line)


def texts() -> dict[str, str]:
    """Every text checked, by where it is."""
    out = {}
    for path in [PROJECT / "params.yaml", *sorted((PROJECT / "docs").glob("*.params.yaml"))]:
        out[f"{path.relative_to(PROJECT)} (comments)"] = _comments(path)
    for path in [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md")),
                 *sorted((PROJECT / "benchmarks").glob("*.md"))]:
        out[str(path.relative_to(PROJECT))] = path.read_text(encoding="utf-8")
    for path in sorted([*(PROJECT / "pipeline").rglob("*.py"), *(PROJECT / "stages").glob("*.py"),
                        *(PROJECT / "benchmarks").glob("*.py")]):
        doc = ast.get_docstring(_tree(path), clean=False)
        if doc:
            out[f"{path.relative_to(PROJECT)} (docstring)"] = doc
    return out


def test_every_module_and_attribute_a_text_names_exists():
    all_texts = texts()
    named = {where: references(text) for where, text in all_texts.items()}
    broken = [f"{where}: {ref}" for where, refs in named.items() for ref in refs
              if is_broken(ref)]
    assert not broken, "texts name what the code does not have:\n" + "\n".join(broken)
    # the check reads every kind of text and finds both kinds of name in them
    kinds = {"comments": 0, "md": 0, "docstring": 0}
    for where, refs in named.items():
        for kind in kinds:
            if kind in where:
                kinds[kind] += len(refs)
    assert all(count > 0 for count in kinds.values()), kinds
    every = [ref for refs in named.values() for ref in refs]
    assert any("/" in ref for ref in every) and any("." in ref and "/" not in ref
                                                    for ref in every)
    assert "pipeline/core/config.py" in named["params.yaml (comments)"]


def test_the_scan_finds_paths_and_dotted_names_and_only_those():
    text = ("Validated in (pipeline/core/config.py); run `python -m stages.plan` or "
            "benchmarks/flops.py, see tests/test_plan.py::test_x and "
            "`pipeline.core.tracking.Tracker.live_run`. The pipeline. Not: stages/*.py, "
            "pipeline/<sub>/<mod>.py, my_pipeline/x.py, a.pipeline.core, pipeline/core/ and "
            "pipeline.yaml.")
    assert references(text) == ["pipeline/core/config.py", "stages.plan", "benchmarks/flops.py",
                                "tests/test_plan.py", "pipeline.core.tracking.Tracker.live_run",
                                "pipeline.yaml"]


@pytest.mark.parametrize("ref", [
    "pipeline/core/config.py", "stages/_common.py", "benchmarks/flops.py", "tests/test_plan.py",
    "pipeline.core", "pipeline.core.io", "pipeline.core.io.torch_load",
    "pipeline.core.tracking.Tracker.live_run", "pipeline.measure.nll.NLL_CALLS_PER_PART",
    "pipeline.cluster.ray_data.run_chunks", "stages.submit", "stages._common.run",
])
def test_names_that_exist_pass(ref):
    assert not is_broken(ref)


@pytest.mark.parametrize("ref", [
    "pipeline/config.py", "pipeline/precision.py", "stages/nothing.py", "tests/test_nothing.py",
    "pipeline.config", "pipeline.metrics.nll_parts", "pipeline.core.io.no_such_function",
    "pipeline.core.tracking.Tracker.no_such_method", "pipeline.core.io.torch_load.anything",
    "stages.nothing", "pipeline.yaml",
])
def test_names_that_do_not_exist_fail(ref):
    assert is_broken(ref)


def test_an_attribute_is_one_the_module_defines(tmp_path):
    """Defined by def, class, assignment (annotated or not, under an if) or import; a name that
    appears only in the module's text (a comment, a call) is not enough."""
    package = tmp_path / "pipeline" / "sub"
    package.mkdir(parents=True)
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(
        "import os\nfrom typing import Any as Anything\nLIMIT = 3\nwidth: int = 4\n"
        "if os.name:\n    FALLBACK = 1\n"
        "def helper():\n    inner = 1\n    return missing()\n"
        "class Box:\n    size = 2\n    def open(self):\n        pass\n"
        "# comment_only\n")
    for ref in ("pipeline.sub", "pipeline.sub.mod", "pipeline.sub.mod.os",
                "pipeline.sub.mod.Anything", "pipeline.sub.mod.LIMIT", "pipeline.sub.mod.width",
                "pipeline.sub.mod.FALLBACK", "pipeline.sub.mod.helper", "pipeline.sub.mod.Box",
                "pipeline.sub.mod.Box.size", "pipeline.sub.mod.Box.open", "pipeline/sub/mod.py"):
        assert not is_broken(ref, tmp_path), ref
    for ref in ("pipeline.sub.mod.inner", "pipeline.sub.mod.missing",
                "pipeline.sub.mod.comment_only", "pipeline.sub.mod.helper.inner",
                "pipeline.sub.other", "pipeline/sub/other.py"):
        assert is_broken(ref, tmp_path), ref


@pytest.mark.parametrize("stage, says", [("train", "to train with"),
                                         ("sample", "run to sample"),
                                         ("evaluate", "to evaluate")])
def test_the_seed_help_says_what_the_seed_picks(stage, says):
    main = importlib.import_module(f"stages.{stage}").main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    seed = " ".join(out.getvalue().split("--seed SEED, -s SEED", 1)[1].split("\n  -")[0].split())
    assert seed.startswith("which of study.seeds") and says in seed, seed
    assert stage == "train" or "train with" not in seed
