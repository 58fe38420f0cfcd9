"""Typed configuration: dataclasses, dotted-path overrides and dict round trips.

Every part owns a small frozen dataclass of its settings; the pipeline's presets compose them.
Overrides arrive as ``{"stage1.resolution": 128}`` from the protocol's job spec or as
``stage1.resolution=128`` strings from the CLI; both are checked against the field's type here,
so a typo or a wrong type is a clear error, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value that does not fit the typed configuration."""


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` (possibly a CLI string) to type ``tp`` or raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} fits none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a sequence, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            out = [_coerce(v, a, path) for v, a in zip(value, args)]
        else:
            inner = args[0] if args else Any
            out = [_coerce(v, inner, path) for v in value]
        return tuple(out) if origin is tuple else out
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, path)
        raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: cannot set a value of type {tp}")


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown setting {where}{sorted(unknown)[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Nested plain-data (msgpack/JSON-safe) view of a dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def apply_overrides(obj: T, overrides: Mapping[str, Any]) -> T:
    """Return a copy of dataclass ``obj`` with dotted-path overrides applied and type-checked."""
    for key, value in overrides.items():
        obj = _set_path(obj, key.split("."), value, key)
    return obj


def _set_path(obj: Any, parts: list[str], value: Any, full: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"unknown setting {full}")
    name = parts[0]
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ConfigError(f"unknown setting {full} (no '{name}'; known: {', '.join(sorted(fields))})")
    current = getattr(obj, name)
    if len(parts) == 1:
        new = _coerce(value, _hints(type(obj))[name], full)
    else:
        new = _set_path(current, parts[1:], value, full)
    return dataclasses.replace(obj, **{name: new})


def parse_cli_overrides(items: typing.Iterable[str]) -> dict[str, str]:
    """Turn ``["stage1.steps=100", ...]`` into a dict; values stay strings until applied."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. stage1.steps=200)")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
