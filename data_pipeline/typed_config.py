"""Typed configuration from dataclasses: YAML/dict -> nested dataclass, ``--a.b=value`` overrides.

Generic (knows nothing about the data build): :mod:`data_pipeline.config` declares the
dataclasses. Unknown keys and values of the wrong type are clear errors that name the key.

    cfg = from_dict(BuildConfig, apply_overrides(yaml_dict, ["crawl.timeout=5"]))
    for key, typ, default, doc in describe(BuildConfig): ...
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterator, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(t: Any) -> str:
    if typing.get_origin(t) is Literal:
        return "|".join(str(a) for a in typing.get_args(t))
    if typing.get_origin(t) is not None or isinstance(t, types.UnionType):
        return str(t).replace("typing.", "")
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def coerce(value: Any, t: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to type ``t``, or raise ConfigError."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if t is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(t)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple, typing.Sequence):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if _is_dataclass_type(t):
        if isinstance(value, t):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {t.__name__}, got {value!r}")
        return from_dict(t, value, prefix=key + ".")
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if t is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if t is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if t is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if isinstance(t, type) and isinstance(value, t):
        return value
    raise ConfigError(f"{key}: cannot convert {value!r} to {_type_name(t)}")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; missing keys keep their defaults."""
    data = dict(data or {})
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys under '{prefix or '<top>'}': {', '.join(sorted(names))}"
        )
    kwargs = {k: coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Plain dict/list/scalar tree of a dataclass (tuples become lists: JSON/YAML friendly)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> (``"a.b"``, YAML-parsed value); ``"flag"`` alone means true."""
    text = text[2:] if text.startswith("--") else text
    if "=" not in text:
        return text.replace("-", "_"), True
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML turns "1e-3"-like or "off" strings into numbers/bools; coerce() fixes types later.
    return key.replace("-", "_"), value


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (copying the touched levels)."""
    out = dict(data)
    for key, value in overrides:
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def describe(cls: type, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every leaf field, for ``--help`` texts."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if _is_dataclass_type(t):
            yield from describe(t, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        yield prefix + f.name, _type_name(t), default, str(f.metadata.get("help", ""))
