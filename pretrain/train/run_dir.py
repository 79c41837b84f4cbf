"""The run dir's ownership and the files that describe a run.

`claim(run_dir, ckpt_cfg)` (collective, at start): rank 0 takes the run dir's lock
(`<run>/.lock`, held for the whole run: a second training on the same dir stops with an error
naming the holder) and checks what the dir holds. With `checkpoint.resume=false` an earlier
run's state (checkpoints, metrics.jsonl, eval results, the MLflow run id) is refused, or with
`checkpoint.overwrite=true` deleted first, so two runs never mix in one dir.

`write_run_files` (rank 0): `run_config.yaml` (resolved config), `ds_config.json` (the
DeepSpeed config actually used) and `git_sha.txt` (code version, `-dirty` when the working
tree had changes), each written atomically. `trim_metrics` cuts metrics.jsonl back to the
step a run resumes from.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from pretrain import fs
from pretrain.config import RunConfig, to_dict
from pretrain.config.schema import CheckpointConfig
from pretrain.train.distributed import broadcast_object

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
METRICS_FILE = "metrics.jsonl"
# What an earlier run leaves that a new run must not inherit (mlflow.db and mlartifacts/ are
# stores that keep every run apart by id, so they stay).
RUN_STATE = ("checkpoints", METRICS_FILE, "eval", "mlflow_run_id.txt")
_TRASH = ".overwritten-"


class RunDirError(RuntimeError):
    """The run dir is in use by another process, or holds a run this start would mix with."""


def claim(run_dir: Path, ckpt_cfg: CheckpointConfig, is_main: bool) -> None:
    """Collective: lock the run dir on rank 0 and check (or clear) an earlier run; every rank
    raises the same RunDirError when the run may not start."""
    error = None
    if is_main:
        try:
            fs.lock_dir(run_dir, "training")
            _check_earlier_run(run_dir, ckpt_cfg)
        except (fs.DirBusyError, RunDirError) as exn:
            error = str(exn)
    error = broadcast_object(error)
    if error:
        raise RunDirError(error)


def _earlier_run(run_dir: Path) -> list[str]:
    return [name for name in RUN_STATE if (run_dir / name).exists()
            and not ((run_dir / name).is_dir() and not any((run_dir / name).iterdir()))]


def _check_earlier_run(run_dir: Path, ckpt_cfg: CheckpointConfig) -> None:
    for leftover in run_dir.glob(_TRASH + "*"):  # an overwrite cut short: finish deleting it
        shutil.rmtree(leftover, ignore_errors=True)
    found = _earlier_run(run_dir)
    if ckpt_cfg.resume or not found:
        return
    if not ckpt_cfg.overwrite:
        raise RunDirError(
            f"run dir {run_dir} holds an earlier run ({', '.join(found)}) and checkpoint.resume=false would "
            "mix the two. Pass --checkpoint.resume=true to continue it, --checkpoint.overwrite=true to delete "
            "it and start a new run, or use another output_dir.")
    # Move everything aside in one directory first (renames are atomic), then delete it: a
    # crash part-way leaves either the old run intact or a hidden trash dir the next start removes.
    trash = run_dir / f"{_TRASH}{time.strftime('%Y%m%dT%H%M%S')}"
    trash.mkdir()
    for name in found:
        (run_dir / name).rename(trash / name)
    fs.fsync_dir(run_dir)
    shutil.rmtree(trash)
    log.warning("checkpoint.overwrite=true: deleted the earlier run's %s from %s", ", ".join(found), run_dir)


def git_sha(repo: Path = REPO_ROOT) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return sha + ("-dirty" if dirty else "")


def write_run_files(run_dir: Path, cfg: RunConfig, ds_config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run_config.yaml"
    now = to_dict(cfg)
    if path.is_file():
        before = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        changed = sorted(f"{s}.{k}" for s in now if isinstance(now[s], dict)
                         for k in now[s] if (before.get(s) or {}).get(k) != now[s][k])
        if changed:
            log.warning("run config differs from the previous start of this run dir: %s", changed)
    fs.write_text(path, yaml.safe_dump(now, sort_keys=False))
    fs.write_text(run_dir / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
    fs.write_text(run_dir / "git_sha.txt", git_sha() + "\n")


def trim_metrics(run_dir: Path, step: int) -> int:
    """Keep the metrics.jsonl records of steps <= `step` (the step this start continues from)
    and drop the rest: records a killed run wrote after its last checkpoint (they would be
    written again) and a torn last line. Returns how many lines were dropped."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        fs.write_text(path, "".join(kept))
        log.info("metrics.jsonl: dropped %d records after step %d (or torn) before continuing", dropped, step)
    return dropped
