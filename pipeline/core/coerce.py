"""From a parsed YAML mapping to a frozen dataclass, checked key by key against its type hints.

Generic: nothing here knows the study. `build_section` refuses unknown keys (suggesting the
closest name) and coerces each value to its annotation (int, float, bool, str, Literal choices,
tuples, Optional / Union), raising `ConfigError` with the key's dotted path. `choices` reads a
Literal field's allowed values, so the annotation is their only home.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import fields
from typing import Any, Literal, Union

from pipeline.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A params.yaml problem, phrased for the user: which key, what is wrong, what is allowed."""


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The values the Literal-typed field `name` of dataclass `cls` allows (in order)."""
    hint = typing.get_type_hints(cls)[name]
    while typing.get_origin(hint) is not Literal:  # tuple[Literal[...], ...]
        hint = typing.get_args(hint)[0]
    return typing.get_args(hint)




def build_section(cls: type, raw: Any, where: str):
    """Build dataclass `cls` from a mapping, checking unknown keys and each value's type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {describe_value(raw)}")
    check_unknown(cls, raw, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name in raw:
            values[f.name] = coerce(raw[f.name], hints[f.name], f"{where}.{f.name}")
    return cls(**values)


def check_unknown(cls: type, raw: dict, where: str) -> None:
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{key}'{suggest(str(key), names)}; "
                              f"allowed: {', '.join(names)}")


def coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], where)
        for option in inner:  # e.g. 'all' or a list of steps: the first that fits
            try:
                return coerce(value, option, where)
            except ConfigError:
                continue
        expected = [_describe(a) for a in args]
        raise ConfigError(f"{where}: {describe_value(value)} is not allowed; expected "
                          f"{', '.join(expected[:-1])} or {expected[-1]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{value}' is not allowed; choose one of: "
                              f"{', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {describe_value(value)}")
        return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {describe_value(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {describe_value(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {describe_value(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {describe_value(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {describe_value(value)}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug in this module


def _describe(hint: Any) -> str:
    """A type hint in words, for error messages."""
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}s"
    return {int: "integer", float: "number", str: "string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def describe_value(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


def suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the result round-trips through YAML/JSON."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
