"""Build a `RunConfig` from a YAML file plus `--dotted.key=value` overrides, and back.

The rules (strict keys and types, YAML-parsed overrides, `base:` chains) are those of the
one config engine, pretrain/config/engine.py, which the data build's config uses too.
Override values are parsed as YAML, so `--train.global_batch=64`, `--train.precision=bf16`,
`--train.debug_nan_at_steps=[3,4]` and `--data.sources=/data/{000..009}.tar` all work.

    cfg = load_config("run.yaml", ["--train.global_batch=64", "--output_dir=runs/a"])
    save_config(cfg, "runs/a/run_config.yaml"); flatten(cfg) -> {"train.global_batch": 64, ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pretrain.config.engine import (BASE_KEY, ConfigError, deep_merge, from_dict, parse_overrides,
                                    read_config_file, to_dict)
from pretrain.config.schema import RunConfig

__all__ = ["BASE_KEY", "ConfigError", "deep_merge", "flatten", "from_dict", "load_config", "parse_overrides",
           "read_config_file", "save_config", "to_dict"]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """The run config from a YAML file (or none; its `base:` chain merged) with command-line
    overrides applied."""
    raw: dict[str, Any] = read_config_file(path) if path else {}
    raw = deep_merge(raw, parse_overrides(list(overrides or [])))
    return from_dict(RunConfig, raw)


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
