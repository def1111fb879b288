"""dvc.yaml against the code: each stage's deps are exactly the project modules it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import in `path`, at any depth (imports inside functions too),
    with `from a import b` also naming `a.b` (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_file(name: str) -> Path | None:
    if name.split(".")[0] not in PACKAGES:
        return None
    path = PROJECT / (name.replace(".", "/") + ".py")
    return path if path.is_file() else None


def import_closure(module: str) -> set[str]:
    """The project files reached from `module` through its imports, itself included."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
    return {str(p.relative_to(PROJECT)) for p in seen}


STAGES = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_the_import_closure_of_its_command(name):
    stage = STAGES[name]
    command = stage["cmd"].split()
    module = command[command.index("-m") + 1]
    listed = {d for d in stage["deps"] if d.endswith(".py")}
    closure = import_closure(module)
    assert listed == closure, (f"dvc.yaml stage '{name}': missing {sorted(closure - listed)}, "
                               f"not imported {sorted(listed - closure)}")


def test_the_closure_follows_imports_inside_functions():
    closure = import_closure("stages.tabulate")
    assert {"stages/tabulate.py", "stages/_common.py", "pipeline/reporting/findings.py",
            "pipeline/measure/stats.py"} <= closure  # imported inside main() and run_tabulate()
    assert "stages/train.py" not in closure


# tabulate rebuilds its tables from the metrics in seconds, and they are kept in git
REBUILT_IN_SECONDS = {"tabulate"}


@pytest.mark.parametrize("name", sorted(set(STAGES) - REBUILT_IN_SECONDS))
def test_a_stage_that_takes_time_keeps_its_run_cache(name):
    """DVC deletes a stage's outputs before running it, and keeps no run-cache entry for a stage
    with an uncached `outs` entry (uncached metrics and plots are fine): after a run refused for
    broken params, such a stage's outputs could only come back by running it again."""
    uncached = [next(iter(entry)) for entry in STAGES[name].get("outs", [])
                if isinstance(entry, dict) and next(iter(entry.values())).get("cache") is False]
    assert not uncached, f"dvc.yaml stage '{name}': uncached outs {uncached}"


def test_where_ray_runs_is_no_stage_param():
    """`cluster` (storage, placement) changes no result: moving checkpoints to S3 or spreading
    workers over nodes must not make DVC rerun a stage."""
    for name, stage in STAGES.items():
        assert not [p for p in stage.get("params", []) if str(p).startswith("cluster")], name


def test_how_many_workers_sample_and_evaluate_is_no_stage_param():
    """sample.* and evaluate.* num_workers / cpus_per_worker change no sample and no score
    (a seed per image, chunks fixed by the other params): moving the study onto more workers
    must not make DVC rerun it. Every other key of those sections is listed where it is read."""
    from pipeline.core.config import WORKER_KEYS

    for name, stage in STAGES.items():
        params = [str(p) for p in stage.get("params", [])]
        assert not [p for p in params if p in ("sample", "evaluate")], name  # whole sections
        assert not [p for p in params if p.split(".")[-1] in WORKER_KEYS
                    and p.split(".")[0] in ("sample", "evaluate")], name
    listed = {p for p in STAGES["sample"]["params"] if str(p).startswith("sample.")}
    assert "sample.use_gpu" in listed and "sample.num_samples" in listed
