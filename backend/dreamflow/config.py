"""Typed configuration: dataclasses, dotted-path overrides, declared ranges and dict round trips.

Every part owns a small frozen dataclass of its settings; the pipeline's presets compose them.
Overrides arrive as ``{"stage1.resolution": 128}`` from the protocol's job spec or as
``stage1.resolution=128`` strings from the CLI; both are checked against the field's type here,
so a typo or a wrong type is a clear error, never a silently ignored setting.

Every numeric setting declares its valid range where it is defined, with :func:`setting`
(``steps: int = setting(4000, 1, 100_000, cost="steps")``); :func:`check_ranges` checks a whole
configuration against them, so a job is refused with the setting's name and range before it runs.
Settings that name a model or a file declare ``path="model"`` or ``path="file"``: a server checks them against the
folders its operator allows (:func:`path_settings`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value that does not fit the typed configuration."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: ``lo <= value <= hi`` (``lo < value`` when ``lo_open``).

    ``cost`` names an operator cap that also bounds it (``"steps"``, ``"resolution"``).
    """

    lo: float
    hi: float
    lo_open: bool = False
    cost: str | None = None

    def contains(self, value: float) -> bool:
        """Whether ``value`` is a finite number inside the range."""
        return math.isfinite(value) and (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"


def setting(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            cost: str | None = None, path: Literal["model", "file"] | None = None) -> Any:
    """A dataclass field with its valid range (numbers), or marked as naming a model or a file (``path``)."""
    meta: dict[str, Any] = {}
    if lo is not None and hi is not None:
        meta["range"] = Range(lo, hi, lo_open, cost)
    if path:
        meta["path"] = path
    return dataclasses.field(default=default, metadata=meta)


def _walk(obj: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every leaf field of a dataclass tree: (dotted name, field, value)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _walk(value, f"{name}.")
        else:
            yield name, f, value


def numeric_settings(obj: Any) -> Iterator[tuple[str, Range, Any]]:
    """(dotted name, declared range, value) of every ranged setting of a configuration."""
    for name, f, value in _walk(obj):
        if "range" in f.metadata:
            yield name, f.metadata["range"], value


def unranged_numbers(obj: Any) -> list[str]:
    """Dotted names of numeric settings that declare no range (a test keeps this empty)."""
    out = []
    for name, f, value in _walk(obj):
        numbers = value if isinstance(value, (tuple, list)) else (value,)
        if "range" not in f.metadata and any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            out.append(name)
    return out


def check_ranges(obj: Any, caps: Mapping[str, int] | None = None) -> None:
    """Raise ConfigError naming the first setting outside its declared range (or an operator cap)."""
    caps = caps or {}
    for name, rng, value in numeric_settings(obj):
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if not rng.contains(v):
                raise ConfigError(f"{name} = {v!r} is outside its valid range {rng}")
            cap = caps.get(rng.cost) if rng.cost else None
            if cap is not None and v > cap:
                raise ConfigError(f"{name} = {v!r} is over this server's limit of {cap} "
                                  f"(its operator caps {rng.cost} with --max-{rng.cost})")


def path_settings(obj: Any) -> Iterator[tuple[str, str, str]]:
    """(dotted name, "model" or "file", value) of every setting that names something on the machine that runs the job."""
    for name, f, value in _walk(obj):
        if f.metadata.get("path"):
            yield name, f.metadata["path"], value


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` (possibly a CLI string) to type ``tp`` or raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    if tp in (bool, int, float):
        return _coerce_scalar(value, tp, path)
    if tp is Any or (origin is None and isinstance(tp, type) and isinstance(value, tp)):
        return value
    if tp is str:
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, get_args(tp)))}")
        return value
    if origin in (tuple, list):
        return _coerce_sequence(value, tp, path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return from_dict(tp, value, path)
        raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
    raise ConfigError(f"{path}: cannot set a value of type {tp}")


def _coerce_sequence(value: Any, tp: Any, path: str) -> Any:
    if isinstance(value, str):
        value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a sequence, got {value!r}")
    args = get_args(tp)
    if get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        out = [_coerce(v, a, path) for v, a in zip(value, args)]
    else:
        out = [_coerce(v, args[0] if args else Any, path) for v in value]
    return tuple(out) if get_origin(tp) is tuple else out


def _coerce_scalar(value: Any, tp: type, path: str) -> Any:
    """bool, int or float from a value of that type or from a CLI string; bools are never numbers."""
    text = value.strip().lower() if isinstance(value, str) else None
    if tp is bool:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if not isinstance(value, bool):
        try:
            if tp is int:
                if isinstance(value, float) and value.is_integer():
                    return int(value)
                if isinstance(value, int) or text is not None:
                    return int(value)
            elif isinstance(value, (int, float)) or text is not None:
                return float(value)
        except (ValueError, OverflowError):
            pass
    raise ConfigError(f"{path}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")


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
