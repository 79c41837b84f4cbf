"""Checkpoints of a run dir: save (complete-only tags), auto-resume, retention.

Layout: `<run>/checkpoints/step_00001000/` holds DeepSpeed's `engine.save_checkpoint` files,
one `rng_rank00000.pt` per rank (python/numpy/torch/cuda RNG states), and `COMPLETE`.
A tag counts only when `COMPLETE` exists and every file it lists still has the recorded
size: rank 0 writes it after a barrier that follows every rank's writes and fsyncs, so a save
cut mid-write (killed job, full disk, truncated copy, power loss) is never resumed from.
`latest` (the file DeepSpeed's own tools read) is updated only after `COMPLETE`; markers, RNG
files and `latest` are written atomically (temporary, fsync, rename, directory fsync).

Offline readers (complete tags, consolidated weights) live in pretrain.modelio; this
module keeps save and resume. Resume reads every file weights-only.

    tag = save(engine, "runs/a", step=1000, client_state={...}, keep_last=3)
    client_state = resume(engine, "runs/a")
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain import fs
from pretrain.modelio.load import deepspeed_globals, weights_only
from pretrain.modelio.tags import CHECKPOINT_DIR, MARKER, TAG_RE as _TAG_RE, complete_tags, read_marker, tag_for
from pretrain.train.distributed import barrier, broadcast_object

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _files_of(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MARKER}


def rng_globals() -> list:
    """What an RNG file needs beyond tensors: numpy's legacy state is an ndarray of uint32
    (pickled via numpy's `_reconstruct`, under `numpy.core` by numpy 1, `numpy._core` by 2)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
            (_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct")]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, run_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int) -> str:
    """Collective: save tag `step_<step>` on every rank, mark it complete, prune old tags."""
    root = Path(run_dir) / CHECKPOINT_DIR
    tag = tag_for(step)
    tag_dir = root / tag
    done = broadcast_object(read_marker(tag_dir) is not None if _rank() == 0 else None)
    if done:  # e.g. a preemption right after the periodic save of the same step
        return tag
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # leftovers of an interrupted save of this step
            shutil.rmtree(tag_dir)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    fs.write_bytes(tag_dir / f"rng_rank{_rank():05d}.pt", buf.getvalue())
    # DeepSpeed does not fsync: each rank flushes the tag (its node's dirty pages on a shared
    # file system) before COMPLETE may vouch for the files.
    fs.fsync_tree(tag_dir)
    barrier()  # every rank's files are written and durable
    if _rank() == 0:
        record = {"step": step, "zero_stage": engine.zero_optimization_stage(),
                  "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                  "files": _files_of(tag_dir)}
        fs.write_text(tag_dir / MARKER, json.dumps(record, indent=1))  # fsync file + dir, then rename
        fs.write_text(root / "latest", tag)
        _prune(root, keep_last)
    barrier()
    log.info("checkpoint %s saved", tag_dir)
    return tag


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete tags; drop older ones and stale incomplete ones."""
    tags = complete_tags(root.parent)
    keep = set(tags[-keep_last:])
    newest = int(_TAG_RE.match(tags[-1]).group(1)) if tags else -1
    for p in root.iterdir():
        m = _TAG_RE.match(p.name)
        if not (p.is_dir() and m) or p.name in keep:
            continue
        if p.name in tags or int(m.group(1)) < newest:
            shutil.rmtree(p, ignore_errors=True)


def resume(engine, run_dir: str | Path) -> dict[str, Any] | None:
    """Collective: load the newest complete tag into `engine` and this rank's RNG states.
    Returns the client state saved with it, or None when there is nothing to resume."""
    tags = complete_tags(run_dir) if _rank() == 0 else None
    tag = broadcast_object(tags[-1] if tags else None)
    if tag is None:
        return None
    root = Path(run_dir) / CHECKPOINT_DIR
    # DeepSpeed torch.loads with weights_only=False: forced to weights-only here
    with weights_only(deepspeed_globals()):
        path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng_file = root / tag / f"rng_rank{_rank():05d}.pt"
    if rng_file.is_file():
        with weights_only(rng_globals()):
            set_rng_state(torch.load(rng_file, weights_only=True))
    else:  # a resume at a larger world size: no saved RNG state for this rank
        log.warning("no RNG state for rank %d in %s; keeping the fresh seed", _rank(), tag)
    log.info("resumed from %s", root / tag)
    return dict(client_state or {}, tag=tag)
