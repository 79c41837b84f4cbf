"""The captioning and bag-of-words objectives through the real `deepspeed pretrain/run.py`
launch (one gloo rank, ZeRO-1, fp32, ViT-tiny with activation checkpointing), like the
contrastive ones: the run trains, evaluates zero-shot at the end through the objective's
own scoring, and resumes exactly: a copy of the finished run dir with its last checkpoint
removed resumes from the step-3 checkpoint and ends with the same parameters (1e-6) and
the same per-step losses as the straight run.

Run: `.venv/bin/python -m pytest -q tests/test_objectives_train.py`.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from train_driver import caption_data, checkpoint_params, launch, max_abs_diff, metrics, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

STEPS = 6


def overrides(data, loss: str) -> list[str]:
    extra = [f"--train.loss={loss}", "--checkpoint.every_steps=3", "--checkpoint.keep_last=3",
             "--eval.zeroshot_dataset=packaged:fashion-mnist", "--eval.limit=16",
             "--eval.templates=['a photo of a {}.']", "--logging.mlflow=false"]
    return tiny_overrides(data, model="ViT-tiny", stage=1, precision="fp32", steps=STEPS, extra=extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return caption_data(tmp_path_factory.mktemp("shards"), corrupt=False)


# One rank each: a launch costs tens of CPU-seconds on a 2-core machine; the losses'
# cross-rank sums are checked against the full batch under 2 ranks in
# tests/test_loss_objectives.py, and a 2-rank resume in tests/test_resume.py.
@pytest.mark.parametrize("loss,nprocs", [("captioning", 1), ("bow", 1)])
def test_objective_trains_evaluates_and_resumes_exactly(loss, nprocs, data, tmp_path):
    straight = launch(tmp_path / "straight", overrides(data, loss), nprocs=nprocs)
    assert straight.rc == 0, straight.output[-4000:]
    m = metrics(straight.run_dir)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert all(math.isfinite(m[s]["loss"]) for s in m) and "logit_scale" not in m[STEPS]
    # a vocabulary-sized softmax starts near log(49408) = 10.8 and goes down
    assert m[1]["loss"] > 8 and m[STEPS]["loss"] < m[1]["loss"]
    result = json.loads((straight.run_dir / "eval" / f"step_{STEPS:08d}.json").read_text())
    assert result["zeroshot"]["n"] == 16 and 0.0 <= result["zeroshot"]["top1"] <= 1.0

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / f"step_{STEPS:08d}")
    (resumed_dir / "checkpoints" / "latest").write_text("step_00000003")
    resumed = launch(resumed_dir, overrides(data, loss), nprocs=nprocs)
    assert resumed.rc == 0, resumed.output[-4000:]
    assert "resumed from" in resumed.output and "step_00000003" in resumed.output
    r = metrics(resumed_dir)
    for step in range(4, STEPS + 1):
        assert r[step]["loss"] == pytest.approx(m[step]["loss"], rel=1e-6, abs=1e-7), step
    a, b = checkpoint_params(straight.run_dir), checkpoint_params(resumed_dir)
    assert set(a) == set(b) and max_abs_diff(a, b) < 1e-6
