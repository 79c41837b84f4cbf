"""Load a model to evaluate: a training run dir of ours, or an OpenAI-layout checkpoint file.

- Run dir (has ``run_config.yaml`` or ``checkpoints/``): any ZeRO stage, consolidated to
  fp32 by the trainer's ``pretrain.train.checkpoint.load_model_from_run``.
- File (``.pt``/``.pth``/``.bin``/...): a state dict in OpenAI's layout (also wrapped in
  ``{"state_dict": ...}`` or with ``module.`` prefixes), or one of OpenAI's TorchScript
  archives; built by ``pretrain.models.from_openai_state_dict``.

The fingerprint keys the feature cache: path, size and mtime of every checkpoint file, so
a rewritten checkpoint never reuses stale features.

    model, fingerprint = load_checkpoint("runs/vit-b32", device="cuda")
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch


def _files_fingerprint(paths: list[Path], extra: object = None) -> str:
    h = hashlib.sha256(json.dumps(extra, default=str).encode())
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "run_config.yaml").is_file() or (path / "checkpoints").is_dir())


def load_state_dict_file(path: Path) -> dict:
    """A plain (possibly wrapped) state dict, or the weights of a TorchScript archive."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile) as first:
        try:  # OpenAI's released files are TorchScript archives
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except (RuntimeError, ValueError) as second:
            raise ValueError(f"{path}: neither a state dict ({first}) nor a TorchScript archive ({second})") from second


def _newest_complete_tag(run_dir: Path) -> str | None:
    try:
        from pretrain.train.checkpoint import complete_tags
    except ImportError:
        return None
    tags = complete_tags(run_dir)
    return tags[-1] if tags else None


def load_checkpoint(
    spec: str | os.PathLike, *, device: str | torch.device = "cpu", tag: str | None = None,
    image_size: int | None = None, act: str | None = None,
) -> tuple[torch.nn.Module, str]:
    """``(model in eval mode on device, fingerprint)``. ``image_size``/``act`` apply to
    OpenAI-layout files only (a run dir's config fixes both)."""
    path = Path(spec).expanduser()
    if is_run_dir(path):
        try:
            from pretrain.train.checkpoint import load_model_from_run
        except ImportError as e:
            raise RuntimeError(f"{path} is a training run dir, but pretrain.train.checkpoint is unavailable: {e}") from e
        tag = tag or _newest_complete_tag(path)  # resolved here so the fingerprint names it
        model = load_model_from_run(str(path), tag=tag, device=str(device))
        tag_dir = path / "checkpoints" / tag if tag else path / "checkpoints"
        files = [p for p in tag_dir.rglob("*") if p.is_file()] if tag_dir.is_dir() else []
        fp = _files_fingerprint(files + [p for p in [path / "run_config.yaml"] if p.is_file()], extra=("run", tag))
    elif path.is_file():
        from pretrain.models import from_openai_state_dict

        overrides = {"act": act} if act else {}
        model = from_openai_state_dict(load_state_dict_file(path), image_size=image_size, **overrides)
        fp = _files_fingerprint([path], extra=("openai", image_size, act))
    else:
        raise FileNotFoundError(f"checkpoint {spec!r} is neither a run dir (run_config.yaml / checkpoints/) nor a file")
    return model.to(device).eval(), fp
