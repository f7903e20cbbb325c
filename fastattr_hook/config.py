"""Typed YAML configuration: dataclasses are the schema.

``load_yaml(SomeConfig, path)`` rejects unknown keys, missing required keys and wrong types with
an error naming the file and the dotted key, so a typo in a config never passes silently.
Supported field types: str, int, float, bool, ``Literal[...]``, ``X | None``, ``list[X]``,
``dict[str, X]`` and nested dataclasses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .files import atomic_write_text
from .errors import FastattrError

__all__ = ["from_dict", "to_dict", "load_yaml", "read_yaml", "save_yaml"]

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> FastattrError:
        return FastattrError(
            f"{source}: key '{key}' must be {expected}, got {type(value).__name__} {value!r:.80}"
        )

    if tp is Any:
        return value
    if tp is dict:
        tp, origin, args = dict[str, Any], dict, (str, Any)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key, source)
        for candidate in inner:
            try:
                return _convert(candidate, value, key, source)
            except FastattrError:
                continue
        raise fail(" or ".join(_type_name(a) for a in inner))
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise fail("a list")
        return [_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {str(k): _convert(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail("a mapping")
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str):  # PyYAML reads exponents without a dot (1e-5) as strings
            with contextlib.suppress(ValueError):
                return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise fail(f"a {tp.__name__}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def from_dict(cls: type[T], data: dict, *, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating every key against the field types."""
    if not isinstance(data, dict):
        raise FastattrError(f"{source}: expected a mapping at '{prefix.rstrip('.') or 'top level'}'")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FastattrError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], prefix + name, source)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise FastattrError(f"{source}: missing required key '{prefix}{name}'")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-ready data from a (nested) config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise FastattrError(f"{path}: config file not found")
    return from_dict(cls, read_yaml(path, "fix the file") or {}, source=str(path))


def read_yaml(path: Path, fix: str) -> Any:
    """The data of a YAML file; one that is not UTF-8, not YAML or nested past Python's recursion limit
    (a damaged or hostile file) is an error naming it and saying ``fix``, never a traceback."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        why = f"not UTF-8 (byte {exc.start:,} is {exc.object[exc.start]:#04x})"
    except RecursionError:
        why = "nested too deeply to read"
    except yaml.YAMLError as exc:
        why = f"not valid YAML: {exc}"
    raise FastattrError(f"{path}: {why}; {fix}")


def save_yaml(obj: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True))
