"""2-process CPU trainings on real Fashion-MNIST caption shards (the first under the real `deepspeed`
command, the others under the tests' light node launcher, tests/env_launcher.py).

Three launches, gradient checkpointing on in all (tests/test_resume.py adds ZeRO-2 fp32):
- ViT-tiny, ZeRO-1, bf16, optimizer offload (torch AdamW): the loss decreases below chance;
- ViT-tiny, ZeRO-0, fp32, NaN injected at steps 3, 23 and 24 with
  `train.max_consecutive_nonfinite=2`: step 3 is skipped and counted, training goes on and the
  loss decreases; steps 23-24 stop the run with exit code 3, a clear message and a complete
  checkpoint holding the weights of step 22;
- RN-tiny, ZeRO-3, bf16 (where gloo's abort at exit was first seen, docs/cpu_development.md): the loss
  decreases, both processes exit 0, zero-shot and retrieval evaluation run on gathered
  parameters, and `python -m pretrain.export` writes an OpenAI-layout file that
  `from_openai_state_dict` loads with the consolidated weights, and that the real open_clip
  (peer virtualenv, tests/peer_env.py) loads with our embeddings; the real clip_benchmark CLI on
  that export agrees with our zero-shot top-1 (benchmarks/clip_benchmark_agreement.py).

Run: `.venv/bin/python -m pytest -q tests/test_train_launch.py`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from train_driver import REPO, caption_data, checkpoint_params, launch, max_abs_diff, metrics, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

VIT = ["--model.overrides.vision_patch_size=8"]  # 16 patches at 32 px: a ViT that learns in 24 steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return caption_data(tmp_path_factory.mktemp("shards"))


def _mean(values):
    return sum(values) / len(values)


def assert_learns(run_dir, group: int, first: int = 5, last: int = 8, until: int | None = None) -> None:
    """Mean loss of the last steps is below the first steps' and below chance (ln of the
    contrastive group size: the loss of a model that cannot tell pairs apart)."""
    rows = metrics(run_dir)
    steps = sorted(s for s in rows if until is None or s <= until)
    losses = [rows[s]["loss"] for s in steps if math.isfinite(rows[s]["loss"])]
    start, end = _mean(losses[:first]), _mean(losses[-last:])
    assert end < start - 0.1, f"loss did not decrease: first {losses[:first]}, last {losses[-last:]}"
    assert end < math.log(group) - 0.1, f"loss {end:.3f} not below chance ln({group}) = {math.log(group):.3f}"


@pytest.fixture(scope="module")
def vit_bf16_offload(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vit_z1_bf16_offload") / "run"
    extra = VIT + ["--train.offload_optimizer=true", "--optimizer.impl=torch", "--logging.mlflow=false"]
    return launch(run_dir, tiny_overrides(data, model="ViT-tiny", stage=1, precision="bf16", steps=24,
                                          micro_batch=8, lr=5e-4, extra=extra), launcher="cli")


def test_vit_zero1_bf16_offload_learns(vit_bf16_offload):
    run = vit_bf16_offload
    assert run.rc == 0, run.output[-4000:]
    ds = json.loads((run.run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_accumulation_steps"] == 1
    assert_learns(run.run_dir, group=16)


@pytest.fixture(scope="module")
def vit_nan(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vit_z0_nan") / "run"
    extra = VIT + ["--train.debug_nan_at_steps=[3,23,24]", "--train.max_consecutive_nonfinite=2",
                   "--checkpoint.every_steps=2", "--checkpoint.keep_last=3", "--logging.mlflow=false"]
    return launch(run_dir, tiny_overrides(data, model="ViT-tiny", stage=0, precision="fp32", steps=24,
                                          micro_batch=8, lr=5e-4, extra=extra))


def test_nan_step_is_skipped_and_training_goes_on(vit_nan):
    rows = metrics(vit_nan.run_dir)
    assert [rows[s]["nonfinite_steps"] for s in (2, 3, 4, 22)] == [0, 1, 1, 1]
    assert "step 3: non-finite loss; update skipped (1 in a row)" in vit_nan.output
    assert all(math.isfinite(rows[s]["loss"]) for s in range(4, 23))
    assert_learns(vit_nan.run_dir, group=16, until=22)


def test_consecutive_nonfinite_steps_stop_with_a_checkpoint(vit_nan):
    assert vit_nan.rc == 3, vit_nan.output[-4000:]
    assert "2 consecutive steps with a non-finite loss or gradient" in vit_nan.output
    # limit reached at step 24, itself a logging step: detected there, saved there
    assert "up to step 24 (train.max_consecutive_nonfinite=2); stopped at step 24, checkpoint step_00000024" \
        in vit_nan.output
    last_good, stopped = checkpoint_params(vit_nan.run_dir, "step_00000022"), checkpoint_params(vit_nan.run_dir)
    assert max_abs_diff(last_good, stopped) == 0.0
    assert all(torch.isfinite(v).all() for v in stopped.values())


@pytest.fixture(scope="module")
def rn_zero3_bf16(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rn_z3_bf16") / "run"
    extra = ["--eval.zeroshot_dataset=packaged:fashion-mnist", "--eval.limit=300",
             "--eval.templates=['a photo of a {}.']", f"--eval.retrieval_dataset=captions:{data.val_pattern}",
             "--logging.mlflow=false"]
    return launch(run_dir, tiny_overrides(data, model="RN-tiny", stage=3, precision="bf16", steps=32, micro_batch=8,
                                          extra=extra))


def test_resnet_zero3_bf16_checkpointing_learns_and_exits_cleanly(rn_zero3_bf16):
    run = rn_zero3_bf16
    assert run.rc == 0, run.output[-4000:]
    assert run.output.count("exited with code 0") == 2  # both ranks (tests/env_launcher.py)
    assert "terminate called" not in run.output and "SIGABRT" not in run.output
    # DeepSpeed's shm all-reduce workspaces (66 MB per rank) do not outlive the run
    assert run.leaked_shm == [], run.leaked_shm
    assert json.loads((run.run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    assert_learns(run.run_dir, group=16)


def test_eval_runs_on_gathered_zero3_parameters(rn_zero3_bf16):
    """The in-training evaluation saw the trained weights: an independent evaluation of the
    consolidated fp32 checkpoint agrees (up to the bf16 rounding of the working copy)."""
    from pretrain.eval import load_eval_dataset, zeroshot_eval
    from pretrain.tokenizer import default_tokenizer
    from pretrain.modelio import load_model_from_run

    result = json.loads((rn_zero3_bf16.run_dir / "eval" / "step_00000032.json").read_text())
    zs, rt = result["zeroshot"], result["retrieval"]
    assert zs["n"] == 300 and rt["n_images"] == 64 and 0 <= rt["i2t_r10"] <= 1
    model = load_model_from_run(rn_zero3_bf16.run_dir)
    ds = load_eval_dataset("packaged:fashion-mnist", split="test", limit=300)
    again = zeroshot_eval(model, default_tokenizer(), ds, ["a photo of a {}."], device="cpu")
    assert abs(again["top1"] - zs["top1"]) <= 0.05, (again, zs)
    # Negative control: the untrained model scores differently (so the check above has teeth).
    from pretrain.models import create_model

    torch.manual_seed(0)
    fresh = zeroshot_eval(create_model("RN-tiny", image_size=32), default_tokenizer(), ds, ["a photo of a {}."],
                          device="cpu")
    keys = ("top1", "top5", "mean_per_class_recall")
    assert sum(abs(again[k] - zs[k]) for k in keys) < sum(abs(fresh[k] - zs[k]) for k in keys), (zs, again, fresh)


def test_export_writes_an_openai_layout_checkpoint(rn_zero3_bf16, tmp_path):
    from pretrain.models import from_openai_state_dict

    out = tmp_path / "rn.pt"
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", str(rn_zero3_bf16.run_dir), str(out), "--pt"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sd = torch.load(out, weights_only=True)
    assert sd["logit_scale"].dim() == 0 and "visual.attnpool.c_proj.weight" in sd
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    model = from_openai_state_dict(sd)
    consolidated = checkpoint_params(rn_zero3_bf16.run_dir)
    loaded = dict(model.named_parameters())
    assert max_abs_diff(consolidated, loaded, keys=list(loaded)) == 0.0


def test_export_loads_in_open_clip_with_our_embeddings(rn_zero3_bf16, tmp_path):
    """The trained run's `clip-export --open-clip-config` files, loaded by the real open_clip
    (`add_model_config` + `create_model_and_transforms`), embed like our model of the run."""
    from peer_env import assert_same_embeddings, embed_inputs, our_embeddings, peer_python, run_peer

    from pretrain.modelio import load_model_from_run

    peer_python()  # the missing-peer message before any work
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", str(rn_zero3_bf16.run_dir), str(out / "trained-rn"),
                           "--open-clip-config"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model = load_model_from_run(rn_zero3_bf16.run_dir, device="cpu").eval()
    job, pixels, tokens = embed_inputs(tmp_path, model, "trained")
    job.update(model="trained-rn", config_dir=str(out), weights=str(out / "trained-rn.safetensors"), loader="create")
    (theirs,) = run_peer(tmp_path, [job])
    assert_same_embeddings("trained RN-tiny", our_embeddings(model, pixels, tokens), theirs,
                           float(model.logit_scale.detach()))


def test_clip_benchmark_agrees_with_our_zero_shot(rn_zero3_bf16, tmp_path):
    """benchmarks/clip_benchmark_agreement.py: the real clip_benchmark CLI on the run's export
    (through open_clip) and our eval give the same zero-shot top-1 (within 0.2 points)."""
    import re

    from peer_env import peer_python

    peer_python()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "clip_benchmark_agreement.py"),
                           str(rn_zero3_bf16.run_dir), "--limit", "300", "--work", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours, theirs = map(float, re.search(r"\| acc1 \(top-1\) \| ([0-9.]+) \| ([0-9.]+) \|", proc.stdout).groups())
    assert abs(ours - theirs) <= 0.2 and ours > 0, proc.stdout
    assert json.loads((tmp_path / "clip_benchmark.json").read_text())["task"] == "zeroshot_classification"
