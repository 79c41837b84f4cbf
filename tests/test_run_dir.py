"""Run dirs that cannot be mixed, with real launches (tests/env_launcher.py; RN-tiny, ZeRO-1, fp32, CPU):

1. run A (1 rank, 8 steps, checkpoint every 4) is frozen (SIGSTOP) after logging step 6;
2. run B on the same dir (2 ranks) is refused on every rank: the error names A's rank-0 pid
   and host; A is then killed with SIGKILL (the kernel drops its lock) and a torn line is
   appended to metrics.jsonl, as a kill in the middle of an append leaves it;
3. run C resumes from step 4 and finishes: metrics.jsonl holds each step 1..8 exactly once
   and no torn line; the same MLflow run continues;
4. run D with `checkpoint.resume=false` (2 ranks) is refused and leaves the run dir as it was;
5. run E with `checkpoint.resume=false checkpoint.overwrite=true` (2 steps) is a clean new run:
   only its own tags (no step_4/step_8 of the old run), `latest` at its last step, its own
   metrics, a new MLflow run id (the old MLflow run is kept in the store).
And, in one spawned gloo rank, `checkpoint.save` fsyncs every file of the tag before
COMPLETE, COMPLETE before its directory, `latest` before the checkpoints directory
(os.fsync wrapped in that process).

Run: `.venv/bin/python -m pytest -q tests/test_run_dir.py`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from dist_harness import run_distributed
from train_driver import base_config, caption_data, finish, launch, rank_pids, read_until, start, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def overrides(data, steps: int, every: int, extra: list[str] | None = None) -> list[str]:
    return tiny_overrides(data, model="RN-tiny", stage=1, precision="fp32", steps=steps, micro_batch=8,
                          extra=[f"--checkpoint.every_steps={every}", "--checkpoint.keep_last=3",
                                 "--logging.experiment=run-dir-test", *(extra or [])])


def tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def metric_lines(run_dir: Path) -> list[dict]:
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n"), text[-200:]
    return [json.loads(line) for line in text.splitlines()]  # raises on a torn line


def mlflow_id(run_dir: Path) -> str:
    return (run_dir / "mlflow_run_id.txt").read_text().strip()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = caption_data(tmp_path_factory.mktemp("shards"), corrupt=False)
    run_dir = tmp_path_factory.mktemp("mixed") / "run"
    out = {"run_dir": run_dir}
    # 1. A, frozen mid-run: it still holds the run dir
    a, t0 = start(run_dir, overrides(data, 8, 4), nprocs=1), time.monotonic()
    text, _ = read_until(a, "step 6/8 ")
    pid = rank_pids(a)[0]
    os.killpg(a.pid, signal.SIGSTOP)
    try:
        out["holder_pid"] = pid
        out["a_tags"] = tags(run_dir)
        # 2. B on the same dir
        out["B"] = launch(run_dir, overrides(data, 8, 4), nprocs=2, timeout=180)
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        out["A"] = finish(a, run_dir, t0, 60, text)
    out["a_mlflow"] = mlflow_id(run_dir)
    out["a_metrics"] = [r["step"] for r in metric_lines(run_dir)]
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 2.0')  # the record a SIGKILL cut in half
    # 3. C resumes
    out["C"] = launch(run_dir, overrides(data, 8, 4), nprocs=1)
    out["c_metrics"] = [r["step"] for r in metric_lines(run_dir)]
    out["c_tags"] = tags(run_dir)
    out["c_mlflow"] = mlflow_id(run_dir)
    # 4. D: resume=false on the finished run
    out["D"] = launch(run_dir, overrides(data, 2, 1, ["--checkpoint.resume=false", "--schedule.warmup_steps=1"]),
                      nprocs=1, timeout=180)
    out["d_tags"] = tags(run_dir)
    out["d_metrics"] = [r["step"] for r in metric_lines(run_dir)]
    out["d_mlflow"] = mlflow_id(run_dir)
    # 5. E: resume=false with overwrite=true
    out["E"] = launch(run_dir, overrides(data, 2, 1, ["--checkpoint.resume=false", "--checkpoint.overwrite=true",
                                                  "--schedule.warmup_steps=1"]),
                      nprocs=1)
    return out


def test_second_training_on_a_run_dir_is_refused_naming_the_holder(runs):
    b = runs["B"]
    assert b.rc not in (0, None), b.output[-4000:]
    assert f"is in use by training pid {runs['holder_pid']} on host {socket.gethostname()}" in b.output, \
        b.output[-4000:]
    assert "training steps" not in b.output  # refused before building or training anything
    assert runs["a_tags"] == ["step_00000004"]


def test_resume_after_kill_has_each_step_once_and_no_torn_line(runs):
    c = runs["C"]
    assert c.rc == 0, c.output[-4000:]  # the SIGKILLed holder's lock was released by the kernel
    assert f"resumed from {runs['run_dir'] / 'checkpoints' / 'step_00000004'}" in c.output
    assert max(runs["a_metrics"]) >= 6  # A had logged steps after its checkpoint
    assert runs["c_metrics"] == list(range(1, 9)), runs["c_metrics"]
    assert runs["c_mlflow"] == runs["a_mlflow"]
    assert runs["c_tags"] == ["step_00000004", "step_00000008"]


def test_resume_false_on_a_run_dir_with_checkpoints_is_refused(runs):
    d = runs["D"]
    assert d.rc not in (0, None), d.output[-4000:]
    assert "holds an earlier run" in d.output and "checkpoint.overwrite=true" in d.output, d.output[-4000:]
    assert (runs["d_tags"], runs["d_metrics"], runs["d_mlflow"]) == (
        runs["c_tags"], runs["c_metrics"], runs["c_mlflow"])


def test_overwrite_starts_a_clean_new_run(runs):
    from mlflow import MlflowClient

    e, run_dir = runs["E"], runs["run_dir"]
    assert e.rc == 0, e.output[-4000:]
    assert "resumed from" not in e.output
    assert tags(run_dir) == ["step_00000001", "step_00000002"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert [r["step"] for r in metric_lines(run_dir)] == [1, 2]
    new_id = mlflow_id(run_dir)
    assert new_id != runs["c_mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    new, old = client.get_run(new_id), client.get_run(runs["c_mlflow"])
    assert new.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(new_id, "loss")) == [1, 2]
    assert sorted({m.step for m in client.get_metric_history(old.info.run_id, "loss")}) == list(range(1, 9))
    assert not list(run_dir.glob(".overwritten-*"))


# --- fsync on the checkpoint path ------------------------------------------------------------
def _save_with_fsync_spy(rank: int, world: int, run_dir: str) -> list[tuple[str, str]]:
    from pretrain.train import checkpoint as ckpt
    from pretrain.train.build import build_engine

    events: list[tuple[str, str]] = []
    real = os.fsync

    def spy(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file", path))
        return real(fd)

    cfg = base_config(["--model.name=RN-tiny", "--model.overrides.image_size=32", "--train.global_batch=4",
                       "--train.micro_batch=4", "--train.zero_stage=1", f"--output_dir={run_dir}"])
    engine = build_engine(cfg, world)[0]
    os.fsync = spy
    try:
        ckpt.save(engine, run_dir, 3, {"step": 3}, keep_last=2)
    finally:
        os.fsync = real
    return events


def test_checkpoint_save_fsyncs_files_then_marker_then_directories(tmp_path):
    run_dir = tmp_path / "run"
    events = run_distributed(_save_with_fsync_spy, 1, str(run_dir), timeout_s=240)[0]
    root = run_dir / "checkpoints"
    tag_dir = root / "step_00000003"

    def first(kind: str, match, after: int = -1) -> int:
        for i, (k, path) in enumerate(events):
            if i > after and k == kind and match(Path(path)):
                return i
        raise AssertionError(f"no {kind} fsync matching after #{after}: {events}")

    marker = first("file", lambda p: p.parent == tag_dir and p.name.startswith(".COMPLETE.tmp-"))
    first("dir", lambda p: p == tag_dir, after=marker)  # the rename of COMPLETE is durable
    latest = first("file", lambda p: p.parent == root and p.name.startswith(".latest.tmp-"), after=marker)
    first("dir", lambda p: p == root, after=latest)
    rng = first("file", lambda p: p.parent == tag_dir and p.name.startswith(".rng_rank00000.pt.tmp-"))
    assert rng < marker
    record = json.loads((tag_dir / "COMPLETE").read_text())
    assert "mp_rank_00_model_states.pt" in record["files"]
    for name in record["files"]:  # DeepSpeed's own files (it does not fsync them) and the RNG file
        assert first("file", lambda p, n=name: p == tag_dir / n) < marker
    assert (root / "latest").read_text() == "step_00000003"
