"""SigLIP selectable in the run config (`train.loss: siglip`): the model's learnable
`logit_bias`, its export/import, and training on real DeepSpeed engines.

- config: loss siglip puts the paper's init (scale log 10, bias -10) into model.overrides
  (so run_config.yaml re-creates the model); a bias with another loss, or with
  gradient caching, is rejected;
- model: default models are unchanged (no bias, 3 outputs); with the bias the forward has a
  4th output; OpenAI-layout round trip keeps it (0-dim there, as open_clip names it);
  the optimizer puts it in the no-decay group;
- engine (one spawned gloo rank, ZeRO-1 and ZeRO-3, `build_engine` + `train_step`): steps
  on a fixed batch move the bias (fp32 master) and lower the loss; the step's loss equals
  `siglip_loss` recomputed here from a plain copy of the model.

Run: `.venv/bin/python -m pytest -q tests/test_siglip_train.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_harness import run_distributed
from train_driver import base_config

SIGLIP = ["--train.loss=siglip", "--model.name=ViT-tiny", "--model.overrides.image_size=32",
          "--train.global_batch=8", "--train.micro_batch=8", "--optimizer.lr=1e-2", "--train.seed=2"]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(1, 49406, (8, 77), generator=g)


def test_config_resolves_siglip_model_overrides():
    from pretrain.loss import SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_SCALE

    cfg = base_config(SIGLIP)
    assert cfg.model.overrides["init_logit_bias"] == SIGLIP_INIT_BIAS == -10.0
    assert cfg.model.overrides["init_logit_scale"] == pytest.approx(math.log(10.0))
    assert cfg.model.overrides["init_logit_scale"] == SIGLIP_INIT_LOG_SCALE
    given = base_config(SIGLIP + ["--model.overrides.init_logit_bias=-5.0"])
    assert given.model.overrides["init_logit_bias"] == -5.0
    assert "init_logit_bias" not in base_config([]).model.overrides
    with pytest.raises(ValueError, match="init_logit_bias"):
        base_config(["--model.overrides.init_logit_bias=-10.0"])
    with pytest.raises(ValueError, match="grad_cache"):
        base_config(SIGLIP + ["--train.grad_cache=true"])


def test_model_bias_outputs_round_trip_and_no_decay():
    from pretrain.models import create_model, from_openai_state_dict, to_openai_state_dict
    from pretrain.train.optim import param_groups

    images, tokens = batch()
    plain = create_model("ViT-tiny", image_size=32)
    assert plain.logit_bias is None and "logit_bias" not in to_openai_state_dict(plain)
    assert len(plain(images[:2], tokens[:2])) == 3
    assert float(plain.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    model = create_model("ViT-tiny", image_size=32, init_logit_bias=-10.0, init_logit_scale=math.log(10))
    with torch.no_grad():
        model.logit_bias.fill_(-7.25)
        img, txt, scale, bias = model(images[:2], tokens[:2])
    assert bias.shape == () and float(bias.detach()) == -7.25 and float(scale.detach()) == pytest.approx(10.0)
    sd = to_openai_state_dict(model)
    assert sd["logit_bias"].shape == () and float(sd["logit_bias"]) == -7.25
    back = from_openai_state_dict({k: v.clone() for k, v in sd.items()})
    assert back.logit_bias.shape == (1,) and float(back.logit_bias.detach()) == -7.25
    for k, v in back.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    decay, no_decay = param_groups(model, 0.2)
    assert any(p is model.logit_bias for p in no_decay["params"])
    assert not any(p is model.logit_bias for p in decay["params"])


def _work(rank: int, world: int) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain.loss import get_loss, siglip_loss
    from pretrain.models import create_model
    from pretrain.train.build import build_engine
    from pretrain.train.step import train_step

    images, tokens = batch()
    out = {}
    for stage in (1, 3):
        cfg = base_config(SIGLIP + [f"--train.zero_stage={stage}"])
        engine, _ = build_engine(cfg, world)
        full = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
        # the step's loss, recomputed on a plain copy of the engine's initial weights
        ref = create_model(cfg.model.name, **cfg.model.overrides)
        ref.load_state_dict(full)
        with torch.no_grad():
            ref_loss = float(siglip_loss(*ref(images, tokens)))
        losses = [train_step(engine, [{"images": images, "tokens": tokens}], get_loss("siglip")).loss
                  for _ in range(5)]
        bias = float(safe_get_full_fp32_param(engine.module.logit_bias))
        out[stage] = {"bias0": float(full["logit_bias"]), "bias": bias, "losses": losses, "ref_loss": ref_loss}
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [1, 3])
def test_siglip_steps_train_the_bias_and_lower_the_loss(spawned, stage: int):
    r = spawned[stage]
    assert r["bias0"] == -10.0
    assert r["losses"][0] == pytest.approx(r["ref_loss"], rel=1e-5)
    assert r["bias"] > r["bias0"] + 0.01  # at -10 the positives' pull up dominates
    assert all(math.isfinite(x) for x in r["losses"])
    assert r["losses"][-1] < r["losses"][0]


@pytest.fixture(scope="module")
def spawned() -> dict:
    return run_distributed(_work, 1, init_group=False, timeout_s=240)[0]
