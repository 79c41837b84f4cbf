"""Batched feature extraction (progress bar, bf16 autocast on CUDA) and the on-disk cache.

Image features are L2-normalised float32; images that cannot be decoded are dropped and
counted (``FeatureSet.skipped``), so ``indices`` says which dataset items each row is.
The cache stores one ``.npz`` per (checkpoint fingerprint, dataset fingerprint, transform).

    feats = extract_image_features(model, ds, device="cpu", batch_size=256)
    cache = FeatureCache("~/.cache/clip_pretrain/eval_features")
    feats = cache.get_or_compute(ckpt_fp, ds, lambda: extract_image_features(model, ds, device=dev))
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.data.workers import worker_context
from pretrain.progress import progress as show_progress

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    features: np.ndarray  # float32 [M, D], rows L2-normalised
    indices: np.ndarray   # int64 [M]: dataset item of each row
    skipped: int          # items that could not be decoded


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def autocast_for(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slow and lossy for eval)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _collate(batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    ok = [(x, i) for x, i in batch if x is not None]
    images = torch.stack([x for x, _ in ok]) if ok else None
    return images, torch.tensor([i for _, i in ok], dtype=torch.long), len(batch) - len(ok)


def image_batches(
    dataset: torch.utils.data.Dataset,
    device: torch.device,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """Batches ``(images | None, indices, n_undecodable)`` of ``dataset`` in order (items
    ``(tensor|None, index)``; undecodable images are dropped from their batch and counted)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda",
        multiprocessing_context=worker_context(num_workers),
    )


def extract_image_features(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "image features",
) -> FeatureSet:
    """Encode every decodable image of ``dataset`` (items ``(tensor|None, index)``)."""
    device = torch.device(device) if device is not None else model_device(model)
    loader = image_batches(dataset, device, batch_size=batch_size, num_workers=num_workers)
    feats, idx, skipped = [], [], 0
    with torch.no_grad(), autocast_for(device):
        for images, indices, bad in show_progress(loader, desc=desc, disable=not progress, unit="batch"):
            skipped += bad
            if images is None:
                continue
            f = model.encode_image(images.to(device, non_blocking=True))
            feats.append(F.normalize(f.float(), dim=-1).cpu())
            idx.append(indices)
    if skipped:
        log.warning("%s: %d images could not be decoded and were skipped", desc, skipped)
    if not feats:
        raise ValueError(f"{desc}: no image could be decoded ({skipped} skipped)")
    return FeatureSet(torch.cat(feats).numpy(), torch.cat(idx).numpy(), skipped)


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    texts: Sequence[str],
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalised float32 text features [len(texts), D] on ``device``."""
    device = torch.device(device) if device is not None else model_device(model)
    ctx = getattr(model, "context_length", 77)
    out = []
    starts = range(0, len(texts), batch_size)
    with torch.no_grad(), autocast_for(device):
        for start in show_progress(starts, desc="text features", disable=not progress or len(starts) < 2, unit="batch"):
            tokens = tokenizer(list(texts[start:start + batch_size]), context_length=ctx)
            out.append(F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1))
    return torch.cat(out)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of all parameters and buffers (for caching features of an in-process model)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """``.npz`` files under ``root``, one per (checkpoint, dataset, transform) key."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def path(self, checkpoint_fp: str, dataset_fp: str, transform_id: str) -> Path:
        key = hashlib.sha256(f"{checkpoint_fp}|{dataset_fp}|{transform_id}".encode()).hexdigest()[:24]
        return self.root / f"{key}.npz"

    def get_or_compute(self, checkpoint_fp: str, dataset, compute: Callable[[], FeatureSet]) -> FeatureSet:
        p = self.path(checkpoint_fp, dataset.fingerprint, dataset.transform_id)
        if p.is_file():
            try:
                with np.load(p) as z:
                    log.info("feature cache hit: %s", p)
                    return FeatureSet(z["features"], z["indices"], int(z["skipped"]))
            except (OSError, ValueError, KeyError) as e:  # a damaged cache file is recomputed
                log.warning("ignoring unreadable cache file %s: %s", p, e)
        fs = compute()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, features=fs.features, indices=fs.indices, skipped=np.int64(fs.skipped))
        tmp.replace(p)  # atomic: readers never see a half-written file
        return fs
