"""The DeepSpeed config of a run: `ds_configs/` templates + the fields the run config owns.

Batch sizes, gradient accumulation, clipping and precision exist once, in the run config;
templates hold only the settings around them (see ds_configs/README.md). A template that
contradicts the run config is an error, never silently overridden.

    from pretrain.train.ds_config import build_ds_config
    ds = build_ds_config(cfg, world_size=8)   # dict for deepspeed.initialize(config=ds)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pretrain.config import RunConfig, deep_merge

DS_CONFIG_DIR = Path(os.environ.get("CLIP_DS_CONFIGS", Path(__file__).resolve().parents[2] / "ds_configs"))

# Owned by the run config: a template may not set these at all.
RESERVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "optimizer", "scheduler")


def template_path(name: str) -> Path:
    """`zero2` -> ds_configs/zero2.json; a name ending in .json (or with a slash) is a path."""
    if name.endswith(".json") or "/" in name:
        return Path(name)
    return DS_CONFIG_DIR / f"{name}.json"


def load_template(name: str) -> dict[str, Any]:
    path = template_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise ValueError(f"DeepSpeed template {name!r} not found at {path}; templates in {DS_CONFIG_DIR}: {known}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise ValueError(f"DeepSpeed template {path} is not valid JSON: {exn}") from None
    if not isinstance(data, dict):
        raise ValueError(f"DeepSpeed template {path} must hold a JSON object")
    reserved = sorted(set(data) & set(RESERVED_KEYS))
    if reserved:
        raise ValueError(f"DeepSpeed template {path} sets {reserved}: batch sizes, accumulation, clipping, "
                         "optimizer and schedule come from the run config (train.*, optimizer.*, schedule.*)")
    return data


def template_names(cfg: RunConfig) -> list[str]:
    t = cfg.train
    if t.ds_templates:
        names = list(t.ds_templates)
    else:
        names = [f"zero{t.zero_stage}"] + (["offload_optimizer"] if t.offload_optimizer else []) + [t.precision]
    return names if names and names[0] == "base" else ["base"] + names


def uses_cpu_adam(cfg: RunConfig) -> bool:
    """Whether the client optimizer is DeepSpeedCPUAdam (JIT-built op) rather than torch AdamW."""
    impl = cfg.optimizer.impl
    return impl == "cpu_adam" or (impl == "auto" and cfg.train.offload_optimizer)


def guards_nonfinite_in_optimizer(cfg: RunConfig) -> bool:
    """ZeRO-0 fp32 has no DeepSpeed optimizer wrapper that checks gradients, so the client
    optimizer itself skips non-finite steps and clips (pretrain/train/optim.py); DeepSpeed's
    clipping is then off so that gradients are clipped once."""
    return cfg.train.zero_stage == 0 and cfg.train.precision == "fp32"


def build_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Merged templates + run-config fields, checked for contradictions."""
    cfg.validate(world_size)
    t = cfg.train
    merged: dict[str, Any] = {}
    for name in template_names(cfg):
        merged = deep_merge(merged, load_template(name))
    reserved = sorted(set(t.ds_overrides) & set(RESERVED_KEYS))
    if reserved:
        raise ValueError(f"train.ds_overrides sets {reserved}: use the run config's own fields instead")
    merged = deep_merge(merged, t.ds_overrides)

    zero = merged.setdefault("zero_optimization", {})
    if zero.get("stage", t.zero_stage) != t.zero_stage:
        raise ValueError(f"DeepSpeed templates {template_names(cfg)} set zero_optimization.stage="
                         f"{zero['stage']} but train.zero_stage={t.zero_stage}")
    zero["stage"] = t.zero_stage
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    if (device not in (None, "none")) != t.offload_optimizer:
        raise ValueError(f"DeepSpeed templates {template_names(cfg)} give offload_optimizer.device={device!r} "
                         f"but train.offload_optimizer={t.offload_optimizer}")
    for key in ("bf16", "fp16"):
        section = dict(merged.get(key) or {})
        want = t.precision == key
        if "enabled" in section and bool(section["enabled"]) != want:
            raise ValueError(f"DeepSpeed templates {template_names(cfg)} set {key}.enabled={section['enabled']} "
                             f"but train.precision={t.precision}")
        section["enabled"] = want
        merged[key] = section

    merged["train_batch_size"] = t.global_batch
    merged["train_micro_batch_size_per_gpu"] = t.micro_batch
    merged["gradient_accumulation_steps"] = cfg.grad_accum(world_size)
    merged["gradient_clipping"] = 0.0 if guards_nonfinite_in_optimizer(cfg) else t.grad_clip
    if t.offload_optimizer and not uses_cpu_adam(cfg):
        # A client torch AdamW with offload is slow but valid; DeepSpeed refuses it unless told.
        merged["zero_force_ds_cpu_optimizer"] = False
    return merged
