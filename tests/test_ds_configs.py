"""`ds_configs/` templates and the DeepSpeed config built from them + the run config.

Every template file is parsed here and merged into a config; tests/test_train_step.py hands
the merged configs of every template to a real `deepspeed.initialize` and trains with them
(`test_every_template_is_used_by_a_real_engine` checks that coverage).

Optimizer offload is exercised there with a client torch AdamW
(`zero_force_ds_cpu_optimizer: false`), which needs no compiled op. The default offload
optimizer, DeepSpeedCPUAdam, JIT-builds a C++ op on first use (~93 s on 2 cores, docs/cpu_development.md),
too slow for every CI run: tests/test_train_step.py adds a DeepSpeedCPUAdam configuration when
that op is already in the torch-extensions cache or when CLIP_TEST_CPU_ADAM=1 asks for the build.

Run: `.venv/bin/python -m pytest -q tests/test_ds_configs.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.train.ds_config import DS_CONFIG_DIR, build_ds_config, load_template, template_names
from train_driver import base_config

ALL_TEMPLATES = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def test_expected_templates_exist():
    assert {"base", "zero0", "zero1", "zero2", "zero3", "offload_optimizer", "fp32", "bf16", "fp16"} <= set(ALL_TEMPLATES)


@pytest.mark.parametrize("name", ALL_TEMPLATES)
def test_every_template_parses_and_leaves_batch_and_precision_to_the_run_config(name):
    data = json.loads((DS_CONFIG_DIR / f"{name}.json").read_text())
    assert isinstance(data, dict) and data
    assert load_template(name) == data
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler"):
        assert key not in data


@pytest.mark.parametrize("stage, precision, offload", [
    (0, "fp32", False), (1, "bf16", False), (2, "fp16", False), (3, "bf16", True), (2, "fp32", True)])
def test_built_config_has_one_source_of_truth(stage, precision, offload):
    cfg = base_config([f"--train.zero_stage={stage}", f"--train.precision={precision}",
                       f"--train.offload_optimizer={str(offload).lower()}", "--train.global_batch=64",
                       "--train.micro_batch=4", "--train.grad_clip=0.5", "--data.samples_per_epoch=640"])
    ds = build_ds_config(cfg, world_size=4)
    assert template_names(cfg) == ["base", f"zero{stage}"] + (["offload_optimizer"] if offload else []) + [precision]
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 64 / (4 ranks x 4)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    # ZeRO-0 fp32 clips inside the client optimizer (SkipNonFiniteAdamW), never twice.
    assert ds["gradient_clipping"] == (0.0 if stage == 0 else 0.5)
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    if offload:
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert "zero_force_ds_cpu_optimizer" not in ds  # the default impl is DeepSpeedCPUAdam
    torch_offload = build_ds_config(base_config(["--train.offload_optimizer=true", "--optimizer.impl=torch"]), 2)
    assert torch_offload["zero_force_ds_cpu_optimizer"] is False


def _write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_templates_contradicting_the_run_config_are_rejected(tmp_path):
    stage3 = _write(tmp_path, "s3", {"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="stage=3 but train.zero_stage=1"):
        build_ds_config(base_config([f"--train.ds_templates=[{stage3}, fp32]"]), 2)
    batch = _write(tmp_path, "batch", {"train_batch_size": 1024})
    with pytest.raises(ValueError, match="sets \\['train_batch_size'\\]"):
        build_ds_config(base_config([f"--train.ds_templates=[zero1, {batch}]"]), 2)
    with pytest.raises(ValueError, match="bf16.enabled=True but train.precision=fp32"):
        build_ds_config(base_config(["--train.ds_templates=[zero1, bf16]"]), 2)
    with pytest.raises(ValueError, match="offload_optimizer.device='cpu' but train.offload_optimizer=False"):
        build_ds_config(base_config(["--train.ds_templates=[zero2, offload_optimizer, fp32]",
                                     "--train.zero_stage=2"]), 2)
    with pytest.raises(ValueError, match="train.ds_overrides sets"):
        build_ds_config(base_config(["--train.ds_overrides={gradient_accumulation_steps: 2}"]), 2)
    with pytest.raises(ValueError, match="not found"):
        build_ds_config(base_config(["--train.ds_templates=[zero9]"]), 2)


def test_explicit_templates_and_overrides_merge_in_order():
    cfg = base_config(["--train.zero_stage=2", "--train.ds_templates=[zero2, fp32]",
                       "--train.ds_overrides={zero_optimization: {reduce_bucket_size: 1000}}"])
    ds = build_ds_config(cfg, 2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["overlap_comm"] is True  # from zero2.json, kept by the merge


def test_every_template_is_used_by_a_real_engine():
    from test_train_step import COMMON, CONFIGS

    used = set()
    for _, extra in CONFIGS:
        used.update(template_names(base_config(COMMON + extra)))
    assert used == set(ALL_TEMPLATES), f"templates never handed to deepspeed.initialize: {set(ALL_TEMPLATES) - used}"
