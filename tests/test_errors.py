"""One user-facing error type: every stage turns a `UserError` into one line and exit 2, and
lets anything else (a bug) keep its traceback."""

from pathlib import Path

import pytest

from stages import _common

PROJECT = Path(__file__).resolve().parents[1]


def test_a_missing_prepared_split_is_one_line_and_exit_2(tmp_path, capsys):
    from pipeline.data.datasets import load_prepared

    def body(params):
        load_prepared(tmp_path / "digits" / "train.npz")  # a real DataError

    assert _common.run(body, PROJECT / "params.yaml") == _common.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "train.npz" in err and "dvc repro prepare" in err


def test_a_bad_params_file_is_refused_before_the_body_runs(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text((PROJECT / "params.yaml").read_text().replace("steps:", "stepz:", 1))
    ran = []
    assert _common.run(ran.append, bad) == _common.EXIT_USER_ERROR
    assert ran == [] and "stepz" in capsys.readouterr().err


def user_errors() -> list[type]:
    """Every UserError subclass of the project: each module of pipeline/ and stages/ imported,
    then the subclasses walked."""
    import importlib

    from pipeline.core.errors import UserError

    for path in sorted([*(PROJECT / "pipeline").rglob("*.py"), *(PROJECT / "stages").glob("*.py")]):
        module = ".".join(path.relative_to(PROJECT).with_suffix("").parts)
        importlib.import_module(module.removesuffix(".__init__"))
    found, todo = [], [UserError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.split(".")[0] in ("pipeline", "stages") and sub not in found:
                found.append(sub)
                todo.append(sub)
    return sorted(found, key=lambda cls: cls.__name__)


def test_every_error_meant_for_the_user_is_caught_in_the_one_place(capsys):
    errors = user_errors()
    names = {error.__name__ for error in errors}
    # the walk finds errors wherever they live, the classifier's as the checkpoint's
    assert {"ClassifierError", "CheckpointError", "ConfigError", "SubmitError"} <= names
    for error in errors:
        def body(params, error=error):
            raise error(f"{error.__name__}: what is wrong; what to do")

        assert _common.run(body, PROJECT / "params.yaml") == _common.EXIT_USER_ERROR, error
        assert capsys.readouterr().err == f"error: {error.__name__}: what is wrong; what to do\n"


def test_a_bug_keeps_its_traceback():
    def body(params):
        return {}["missing"]

    with pytest.raises(KeyError, match="missing"):
        _common.run(body, PROJECT / "params.yaml")
