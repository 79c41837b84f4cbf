"""Run config: YAML + overrides, typed coercion, validation messages; optimizer groups and LR
schedule (pure functions, no processes).

Run: `.venv/bin/python -m pytest -q tests/test_config.py`.
"""

from __future__ import annotations

import math

import pytest
import yaml

from pretrain.config import flatten, load_config, save_config
from train_driver import base_config

REQUIRED = ["--output_dir=/tmp/r", "--data.sources=/d/{0..3}.tar", "--data.samples_per_epoch=640"]


def test_yaml_plus_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": "runs/a",
        "model": {"name": "ViT-tiny", "overrides": {"image_size": 32}},
        "data": {"sources": [{"url": "/d/a/{0..9}.tar", "weight": 2}, "/d/b/manifest.json"],
                 "samples_per_epoch": 6400},
        "train": {"global_batch": 64, "micro_batch": 8},
    }))
    cfg = load_config(path, ["--train.global_batch=128", "--optimizer.lr=1e-4", "--train.debug_nan_at_steps=[3,4]",
                             "--model.overrides.vision_layers=1", "--data.crop_scale=[0.5,1.0]"])
    assert cfg.train.global_batch == 128 and cfg.train.micro_batch == 8
    assert cfg.optimizer.lr == 1e-4  # "1e-4" is a string to PyYAML: coerced for float fields
    assert cfg.model.overrides == {"image_size": 32, "vision_layers": 1}
    assert [(s.url, s.weight) for s in cfg.data.sources] == [("/d/a/{0..9}.tar", 2.0), ("/d/b/manifest.json", 1.0)]
    assert cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.train.debug_nan_at_steps == [3, 4]
    assert cfg.steps_per_epoch() == 50 and cfg.total_steps() == 50
    assert cfg.grad_accum(world_size=4) == 4


def test_saved_config_round_trips_and_flattens(tmp_path):
    cfg = load_config(None, REQUIRED + ["--train.precision=bf16", "--model.overrides.image_size=48"])
    save_config(cfg, tmp_path / "run_config.yaml")
    assert load_config(tmp_path / "run_config.yaml") == cfg
    flat = flatten(cfg)
    assert flat["train.precision"] == "bf16" and flat["train.global_batch"] == "32"
    assert flat["model.overrides"] == '{"image_size": 48}'
    assert all(isinstance(v, str) for v in flat.values())


@pytest.mark.parametrize("overrides, message", [
    (["--train.globl_batch=3"], "did you mean 'global_batch'"),
    (["--model.name=RN51"], "not in the model zoo"),
    (["--model.overrides.patch=8"], "unknown key"),
    (["--train.precision=fp8"], "train.precision must be one of"),
    (["--train.zero_stage=4"], "train.zero_stage must be 0, 1, 2 or 3"),
    (["--train.precision=bf16", "--train.zero_stage=0"], "bf16 needs train.zero_stage >= 1"),
    (["--train.precision=fp16", "--train.zero_stage=0"], "fp16 needs train.zero_stage >= 1"),
    (["--train.offload_optimizer=true", "--train.zero_stage=0"], "offload_optimizer needs ZeRO stage >= 1"),
    (["--optimizer.impl=cpu_adam"], "only makes sense with train.offload_optimizer"),
    (["--train.global_batch=30", "--train.micro_batch=4"], "must be a multiple of train.micro_batch"),
    (["--data.samples_per_epoch=16"], "smaller than one global batch"),
    (["--schedule.warmup_steps=20"], "must be smaller than the total number of steps"),
    (["--train.loss=triplet"], "train.loss 'triplet' is unknown"),
    (["--data.crop_scale=[0.9,0.5]"], "crop_scale"),
    (["--train.global_batch=yes"], "expected an integer"),
    (["--model.grad_checkpointing=1"], "expected true/false"),
    (["--eval.templates=[a photo]"], "placeholder"),
])
def test_contradictory_or_invalid_settings_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, REQUIRED + overrides)


def test_batch_must_divide_over_world_size_times_micro_batch():
    cfg = load_config(None, REQUIRED + ["--train.global_batch=48", "--train.micro_batch=8"])
    cfg.validate(world_size=3)  # 48 = 3 x 8 x 2
    with pytest.raises(ValueError, match=r"divisible by world_size x train.micro_batch \(4 x 8 = 32\)"):
        cfg.validate(world_size=4)


def test_output_dir_and_sources_are_required():
    with pytest.raises(ValueError, match="output_dir"):
        load_config(None, ["--data.sources=/d/x.tar", "--data.samples_per_epoch=64"])
    with pytest.raises(ValueError, match="data.sources is empty"):
        load_config(None, ["--output_dir=/tmp/r", "--data.samples_per_epoch=64"])


@pytest.mark.parametrize("name", ["RN-tiny", "ViT-tiny"])
def test_weight_decay_only_on_matrices_that_are_not_embeddings(name):
    from pretrain.models import create_model
    from pretrain.train.optim import param_groups

    model = create_model(name, image_size=32)
    decay, rest = param_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in rest["params"]}
    assert len(decayed) + len(plain) == len(names)
    assert all("embedding" not in n and n != "logit_scale" for n in decayed)
    assert {"token_embedding.weight", "positional_embedding", "logit_scale"} <= plain
    assert "text_projection" in decayed
    assert all(dict(model.named_parameters())[n].ndim < 2 or "embedding" in n for n in plain)
    assert all(dict(model.named_parameters())[n].ndim >= 2 for n in decayed)
    if name == "ViT-tiny":
        assert {"visual.class_embedding", "visual.positional_embedding"} <= plain and "visual.proj" in decayed
    else:
        assert "visual.attnpool.positional_embedding" in plain and "visual.bn1.weight" in plain


def test_adam_defaults_follow_the_paper_recipe():
    from pretrain.train.optim import adam_hparams

    vit = adam_hparams(base_config(["--model.name=ViT-tiny"]))
    rn = adam_hparams(base_config(["--model.name=RN-tiny"]))
    assert vit["betas"] == (0.9, 0.98) and vit["eps"] == 1e-6 and rn["eps"] == 1e-8
    custom = adam_hparams(base_config(["--optimizer.betas=[0.8,0.9]", "--optimizer.eps=1e-5"]))
    assert custom["betas"] == (0.8, 0.9) and custom["eps"] == 1e-5


def test_lr_schedule_is_linear_warmup_then_cosine():
    from pretrain.train.optim import lr_at

    cfg = base_config(["--optimizer.lr=1.0", "--schedule.warmup_steps=4", "--schedule.min_lr_ratio=0.1",
                       "--data.samples_per_epoch=448"])
    total = 14
    lrs = [lr_at(s, cfg, total) for s in range(total)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # cosine from 1.0 at step 4 to 0.1 at the last step (13), independent formula:
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 9)) for s in range(4, 14)]
    assert lrs[4:] == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_example_config_lists_every_key_with_its_default():
    from pretrain.config import RunConfig, to_dict
    from train_driver import REPO

    path = REPO / "pretrain" / "train" / "example_run.yaml"
    cfg = load_config(path)
    example = yaml.safe_load(path.read_text())
    defaults = to_dict(RunConfig(output_dir="x", data=cfg.data))
    for section, fields in defaults.items():
        if isinstance(fields, dict):
            assert set(example[section]) == set(fields), section


def test_base_chain_merges_underneath_and_refuses_loops(tmp_path):
    from pretrain.config.loader import load_config

    need = ["--output_dir=/tmp/x", "--data.sources=/x/{0..1}.tar", "--data.samples_per_epoch=64"]
    (tmp_path / "a.yaml").write_text("train: {global_batch: 64, micro_batch: 8}\noptimizer: {lr: 0.1}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\ntrain: {micro_batch: 4}\n")
    cfg = load_config(tmp_path / "sub" / "b.yaml", [*need, "--optimizer.lr=0.2"])
    assert (cfg.train.global_batch, cfg.train.micro_batch, cfg.optimizer.lr) == (64, 4, 0.2)
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ValueError, match="chain loops"):
        load_config(tmp_path / "c.yaml", need)
    (tmp_path / "e.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ValueError, match="must name a YAML file"):
        load_config(tmp_path / "e.yaml", need)
