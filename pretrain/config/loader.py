"""Build a `RunConfig` from a YAML file plus `--dotted.key=value` overrides, and back.

Values are checked against the dataclass annotations as the tree is built (an unknown key
names the closest valid one); each section's `__post_init__` then checks its meaning.
Override values are parsed as YAML, so `--train.global_batch=64`, `--train.precision=bf16`,
`--train.debug_nan_at_steps=[3,4]` and `--data.sources=/data/{000..009}.tar` all work.

    cfg = load_config("run.yaml", ["--train.global_batch=64", "--output_dir=runs/a"])
    save_config(cfg, "runs/a/run_config.yaml"); flatten(cfg) -> {"train.global_batch": 64, ...}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from pretrain.config.schema import RunConfig, SourceConfig


def _fail(path: str, message: str) -> typing.NoReturn:
    raise ValueError(f"config {path or '<root>'}: {message}")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """`value` checked (and gently converted) against the annotation `tp`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ValueError as exn:
                errors.append(str(exn))
        _fail(path, f"{value!r} matches none of {tp}: {errors}")
    if dataclasses.is_dataclass(tp):
        if tp is SourceConfig and isinstance(value, str):
            value = {"url": value}  # a bare pattern is a source of weight 1
        if not isinstance(value, dict):
            _fail(path, f"expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            if item is SourceConfig or dataclasses.is_dataclass(item):
                value = [value]  # one source given without a list
            else:
                _fail(path, f"expected a list, got {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(path, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads "1e-4" (no dot) as a string: accept numeric strings for floats.
        if isinstance(value, bool):
            _fail(path, f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            _fail(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config {path}: unsupported annotation {tp}")  # a schema bug, not user error


def from_dict(cls: type, raw: dict[str, Any], path: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping, recursively; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {names}"
            _fail(sub, f"unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], sub)
    try:
        return cls(**kwargs)
    except ValueError as exn:
        raise ValueError(f"invalid config: {exn}") from None


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--a.b=1", "--c=x"]` -> nested `{"a": {"b": 1}, "c": "x"}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"override {arg!r} must look like --section.key=value")
        key, text = arg[2:].split("=", 1)
        value = yaml.safe_load(text) if text != "" else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {arg!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `extra` merged in (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


BASE_KEY = "base"


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a YAML config file, with its `base:` chain merged underneath.

    `base: other.yaml` (relative to the file that names it) makes `other.yaml` the starting
    point: this file then holds only what differs (the Slurm presets share one paper
    recipe this way). Chains may be several files deep; a cycle is an error."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ValueError(f"config file {path}: `{BASE_KEY}:` chain loops ({chain})")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ValueError(f"config file {path}: `{BASE_KEY}:` must name a YAML file, got {base!r}")
    return deep_merge(read_config_file(path.parent / base, (*_seen, path)), raw)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """The run config from a YAML file (or none; its `base:` chain merged) with command-line
    overrides applied."""
    raw: dict[str, Any] = read_config_file(path) if path else {}
    raw = deep_merge(raw, parse_overrides(list(overrides or [])))
    return from_dict(RunConfig, raw)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML/JSON-able dict of a config tree (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def flatten(cfg: RunConfig) -> dict[str, str]:
    """`{"train.global_batch": "64", ...}`: leaves only, lists/dicts as compact JSON strings
    (the form MLflow params take)."""
    def leaf(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    out: dict[str, str] = {}
    for key, value in to_dict(cfg).items():
        if isinstance(value, dict):  # a section: one param per field
            out.update({f"{key}.{k}": leaf(v) for k, v in value.items()})
        else:
            out[key] = leaf(value)
    return out
