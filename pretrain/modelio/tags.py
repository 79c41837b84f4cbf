"""Complete tags of a run dir: `<run>/checkpoints/step_00001000/` counts only when its
`COMPLETE` record exists and every file it lists still has the recorded size.

The trainer writes the record (pretrain/train/checkpoint.py); offline readers use this
module to pick the newest complete tag without importing the trainer.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MARKER = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_marker(tag_dir: Path) -> dict[str, Any] | None:
    """The COMPLETE record of a tag, or None when the tag is incomplete or damaged."""
    marker = Path(tag_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("files", {}), dict):
        return None
    for name, size in record.get("files", {}).items():
        path = Path(tag_dir) / name
        if not path.is_file() or path.stat().st_size != size:
            log.warning("checkpoint %s: %s is missing or has the wrong size; the tag is not used",
                        Path(tag_dir).name, name)
            return None
    return record


def complete_tags(run_dir: str | Path) -> list[str]:
    """Complete tags of a run dir, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    tags = sorted((int(m.group(1)), p.name) for p in root.iterdir()
                  if p.is_dir() and (m := TAG_RE.match(p.name)))
    return [name for _, name in tags if read_marker(root / name) is not None]


def newest_complete_tag(run_dir: str | Path) -> str | None:
    tags = complete_tags(run_dir)
    return tags[-1] if tags else None
