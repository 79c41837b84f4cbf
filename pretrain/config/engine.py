"""The one typed-config engine: YAML / dicts / ``--dotted.key=value`` -> nested dataclasses.

Generic: it knows no config of the project. The run config (pretrain/config/schema.py)
and the data build's config (data_pipeline/config.py, data_pipeline/filter/config.py)
are declared as dataclasses and built here, with the same rules:

- Strict: an unknown key is an error that names the closest valid key; every value is
  checked against the field's annotation (bool, int, float, str, Literal, list, tuple,
  dict, Optional/Union, nested dataclasses) as the tree is built; each dataclass's
  ``__post_init__`` then checks meaning. Errors are :class:`ConfigError` (a ValueError).
- Gentle only where YAML itself is ambiguous: a numeric string is a float (PyYAML reads
  ``1e-4`` as a string) or an integer when integral (``4e8``); a comma-separated string
  fills a list of scalars (``--crawl.disallowed_header_directives=noai,noindex``); a
  dataclass that sets ``__config_shorthand__ = "field"`` accepts a bare scalar for
  ``{field: scalar}``, and a list of it accepts one item without the list.
- Overrides are YAML-parsed values at dotted keys; files may start from another file with
  ``base: other.yaml`` (:func:`read_config_file`); :func:`to_dict` dumps the resolved tree.

    cfg = from_dict(RunConfig, deep_merge(read_config_file("run.yaml"), parse_overrides(["--train.seed=3"])))
    for key, type_name, default, help in describe(BuildConfig): ...
"""

from __future__ import annotations

import dataclasses
import difflib
import posixpath
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union

import yaml

BASE_KEY = "base"


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


def _fail(path: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"config {path or '<root>'}: {message}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None or isinstance(tp, types.UnionType):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _number(value: Any) -> float | None:
    """A float from a number or a numeric string (never from a bool)."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked (and, as the module docstring says, gently converted) against ``tp``."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, path)
            except ConfigError as exn:
                errors.append(str(exn))
        _fail(path, f"{value!r} matches none of {_type_name(tp)}: {errors}")
    if origin is Literal:
        if value not in args:
            _fail(path, f"{value!r} is not one of {list(args)}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        shorthand = getattr(tp, "__config_shorthand__", None)
        if shorthand and not isinstance(value, dict):
            value = {shorthand: value}
        if not isinstance(value, dict):
            _fail(path, f"expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, typing.Sequence) or tp is list:
        (item,) = args or (Any,)
        if not isinstance(value, (list, tuple)):
            if _is_dataclass_type(item) and getattr(item, "__config_shorthand__", None):
                value = [value]  # one item given without a list
            elif isinstance(value, str) and not _is_dataclass_type(item):
                value = [v.strip() for v in value.split(",") if v.strip()]
            else:
                _fail(path, f"expected a list, got {value!r}")
        return [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(path, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            _fail(path, f"expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        f = _number(value) if isinstance(value, (str, float)) else None
        if f is None or f != int(f):
            _fail(path, f"expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        f = _number(value)
        if f is None:
            _fail(path, f"expected a number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError(f"config {path}: unsupported annotation {tp}")  # a schema bug, not user error


def from_dict(cls: type, raw: dict[str, Any] | None, path: str = "") -> Any:
    """Dataclass ``cls`` from a (nested) mapping; missing keys keep their defaults."""
    if not isinstance(raw, dict) and raw is not None:
        _fail(path, f"expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in (raw or {}).items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {names}"
            _fail(sub, f"unknown key{hint}")
        kwargs[key] = coerce(value, hints[key], sub)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exn:
        raise ConfigError(f"invalid config: {exn}") from None


def to_dict(obj: Any) -> Any:
    """Plain dict/list/scalar tree of a config (tuples become lists: YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``extra`` merged in (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_value(text: str) -> Any:
    """An override's value, parsed as YAML (a string when YAML cannot read it)."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(data: dict[str, Any], items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``data`` with each dotted key set (the touched levels copied)."""
    out = dict(data)
    for key, value in items:
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                raise ConfigError(f"override {key}={value!r} conflicts with the value of {part!r}")
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--a.b=1", "--c=x"]`` -> nested ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    items = []
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --section.key=value")
        key, text = arg[2:].split("=", 1)
        items.append((key, parse_value(text)))
    return set_dotted({}, items)


def _read_text(url: str) -> str:
    if "://" in url:
        import fsspec

        with fsspec.open(url, "rt", encoding="utf-8") as f:
            return f.read()
    return Path(url).read_text(encoding="utf-8")


def read_config_file(path: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a YAML config file (local path or fsspec URL), with its ``base:``
    chain merged underneath: ``base: other.yaml`` (relative to the naming file) is the
    starting point, so a file holds only what differs. A cycle is an error."""
    url = str(path) if "://" in str(path) else str(Path(path).resolve())
    if url in _seen:
        raise ConfigError(f"config file {url}: `{BASE_KEY}:` chain loops ({' -> '.join((*_seen, url))})")
    try:
        raw = yaml.safe_load(_read_text(url)) or {}
    except OSError as exn:
        raise ConfigError(f"config file {url}: {exn}") from exn
    except yaml.YAMLError as exn:
        raise ConfigError(f"config file {url} is not valid YAML: {exn}") from exn
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {url} must hold a mapping at top level")
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {url}: `{BASE_KEY}:` must name a YAML file, got {base!r}")
    parent = posixpath.dirname(url) if "://" in url else str(Path(url).parent)
    joined = base if "://" in base or base.startswith("/") else (
        posixpath.join(parent, base) if "://" in url else str(Path(parent) / base))
    return deep_merge(read_config_file(joined, (*_seen, url)), raw)


def describe(cls: type, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every leaf field, for ``--help`` texts."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            yield from describe(tp, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        yield prefix + f.name, _type_name(tp), default, str(f.metadata.get("help", ""))
