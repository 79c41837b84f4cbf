"""`model.init_from` on real DeepSpeed engines built by the trainer's `build_engine`.

A tiny ViT is exported at 32 px (`to_openai_state_dict`, a `.pt` file) and also trained for
zero steps into a run dir with a complete checkpoint. In one spawned gloo rank:
- a fresh 48 px run (ZeRO-1 and ZeRO-3) initialised from the `.pt` file: the engine's fp32
  weights equal the source's, with the positional embedding equal to
  `resize_positional_embedding`'s output (computed here, independently of the trainer);
- a fresh 48 px run initialised from the run dir: its consolidated weights, resized;
- a run dir that already holds a complete checkpoint ignores init_from (fresh seeded weights);
and in this process: a mismatched architecture raises a clear ValueError.

Run: `.venv/bin/python -m pytest -q tests/test_init_from.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed
from train_driver import base_config, max_abs_diff

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TINY = ["--model.name=ViT-tiny", "--train.global_batch=4", "--train.micro_batch=4", "--train.seed=5"]


def fp32_params(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        v = safe_get_full_fp32_param(p)
        out[name] = (v if v is not None else p.detach()).float().clone().cpu()
    return out


def _work(rank: int, world: int, tmp: str, src_pt: str) -> dict:
    from pretrain.train import checkpoint as ckpt
    from pretrain.train.build import build_engine

    def engine_for(out: str, px: int, stage: int, init_from: str):
        cfg = base_config(TINY + [f"--output_dir={out}", f"--model.overrides.image_size={px}",
                                  f"--train.zero_stage={stage}", f"--model.init_from={init_from}"])
        return build_engine(cfg, world)[0]

    results = {}
    # a source run dir at 32 px with a complete checkpoint (weights: the fresh seed-5 model)
    source_run = f"{tmp}/source_run"
    engine = engine_for(source_run, 32, 1, "")
    ckpt.save(engine, source_run, 1, {}, keep_last=1)
    results["source_run"] = fp32_params(engine)
    for stage in (1, 3):
        results[f"pt_z{stage}"] = fp32_params(engine_for(f"{tmp}/fresh_z{stage}", 48, stage, src_pt))
    results["from_run"] = fp32_params(engine_for(f"{tmp}/fresh_run", 48, 1, source_run))
    # the source run dir itself has a complete checkpoint: init_from must be ignored there
    results["resumable"] = fp32_params(engine_for(source_run, 32, 3, src_pt))
    return results


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    from pretrain.models import create_model, to_openai_state_dict

    tmp = tmp_path_factory.mktemp("init_from")
    torch.manual_seed(1234)  # not the runs' seed: the source differs from any fresh model
    sd = {k: v.clone() for k, v in to_openai_state_dict(create_model("ViT-tiny", image_size=32)).items()}
    torch.save(sd, tmp / "src.pt")
    return run_distributed(_work, 1, str(tmp), str(tmp / "src.pt"), init_group=False, timeout_s=240)[0], sd


def _expected(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from pretrain.models import resize_positional_embedding

    out = resize_positional_embedding(sd, 48)
    out["logit_scale"] = out["logit_scale"].reshape(1)
    return out


@pytest.mark.parametrize("stage", [1, 3])
def test_pt_file_initialises_a_larger_resolution_run(built, stage: int):
    results, sd = built
    got, want = results[f"pt_z{stage}"], _expected(sd)
    assert set(got) == set(want)
    pos = "visual.positional_embedding"
    assert got[pos].shape == (1 + 3 * 3, 128) and sd[pos].shape == (1 + 2 * 2, 128)
    assert max_abs_diff(got, want, [k for k in got if k != pos]) == 0.0  # copied exactly
    torch.testing.assert_close(got[pos], want[pos], rtol=0, atol=1e-6)
    assert not torch.equal(got[pos][1:4], sd[pos][1:4])  # really interpolated, not truncated


def test_run_dir_initialises_from_its_consolidated_checkpoint(built):
    results, _ = built
    source = {k: v.clone() for k, v in results["source_run"].items()}
    source["logit_scale"] = source["logit_scale"].reshape(())
    want = _expected(source)
    torch.testing.assert_close(results["from_run"], want, rtol=0, atol=1e-6)


def test_a_resumable_run_dir_ignores_init_from(built):
    results, sd = built
    got, fresh = results["resumable"], results["source_run"]  # same seed, same size: fresh weights
    assert max_abs_diff(got, fresh) == 0.0
    assert max_abs_diff(got, {k: v.reshape(got[k].shape) for k, v in sd.items()}) > 0.01


def test_architecture_mismatch_is_a_clear_error(tmp_path: Path):
    from pretrain.models import create_model, to_openai_state_dict
    from pretrain.train.build import build_model

    torch.save(to_openai_state_dict(create_model("ViT-tiny", image_size=32)), tmp_path / "vit.pt")
    for extra in (["--model.name=RN-tiny"], ["--model.name=ViT-tiny", "--model.overrides.embed_dim=32"]):
        cfg = base_config(extra + [f"--output_dir={tmp_path}/run", f"--model.init_from={tmp_path}/vit.pt"])
        with pytest.raises(ValueError, match="does not match this run's model architecture"):
            build_model(cfg)
    cfg = base_config([f"--output_dir={tmp_path}/run", f"--model.init_from={tmp_path}/missing.pt"])
    with pytest.raises(FileNotFoundError, match="no such run dir or weights file"):
        build_model(cfg)
