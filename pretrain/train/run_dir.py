"""The files that describe a run, written by rank 0 into its run dir at start:
`run_config.yaml` (resolved config), `ds_config.json` (the DeepSpeed config actually used)
and `git_sha.txt` (code version, `-dirty` when the working tree had changes)."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import RunConfig, save_config, to_dict

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


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
    if path.is_file():
        before = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        now = to_dict(cfg)
        changed = sorted(f"{s}.{k}" for s in now if isinstance(now[s], dict)
                         for k in now[s] if (before.get(s) or {}).get(k) != now[s][k])
        if changed:
            log.warning("run config differs from the previous start of this run dir: %s", changed)
    save_config(cfg, path)
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n", encoding="utf-8")
    (run_dir / "git_sha.txt").write_text(git_sha() + "\n", encoding="utf-8")
