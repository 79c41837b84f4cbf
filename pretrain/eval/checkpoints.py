"""Load a model to evaluate: a training run dir of ours, or an OpenAI-layout checkpoint file,
through the one weights-only loader (pretrain.modelio).

- Run dir (has ``run_config.yaml`` or ``checkpoints/``): any ZeRO stage, consolidated to fp32.
- Hugging Face CLIP dir (``hf:DIR``, or a dir with config.json + model.safetensors).
- File (``.safetensors``/``.pt``/``.pth``/``.bin``/...): a state dict in OpenAI's layout (also wrapped in
  ``{"state_dict": ...}`` or with ``module.`` prefixes). One of OpenAI's TorchScript
  archives only with ``allow_torchscript=True`` (CLI ``--allow-torchscript-code``): it runs
  the code it contains.

The fingerprint keys the feature cache: path, size and mtime of every checkpoint file, so
a rewritten checkpoint never reuses stale features.

    model, fingerprint = load_checkpoint("runs/vit-b32", device="cuda")
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pretrain.modelio import is_hf_dir, is_run_dir, load_model, load_state_dict_file, newest_complete_tag

__all__ = ["is_run_dir", "load_checkpoint", "load_state_dict_file"]


def _files_fingerprint(paths: list[Path], extra: object = None) -> str:
    h = hashlib.sha256(json.dumps(extra, default=str).encode())
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_checkpoint(
    spec: str | os.PathLike, *, device: str | torch.device = "cpu", tag: str | None = None,
    image_size: int | None = None, act: str | None = None, allow_torchscript: bool = False,
) -> tuple[torch.nn.Module, str]:
    """``(model in eval mode on device, fingerprint)``. ``image_size``/``act`` apply to
    OpenAI-layout files only (a run dir's config fixes both)."""
    hf = str(spec).startswith("hf:")
    path = Path(str(spec).removeprefix("hf:")).expanduser()
    if hf or is_hf_dir(path):
        model = load_model(f"hf:{path}", image_size=image_size, device=str(device))
        files = [p for p in path.iterdir() if p.is_file()]
        fp = _files_fingerprint(files, extra=("hf", image_size))
    elif is_run_dir(path):
        tag = tag or newest_complete_tag(path)  # resolved here so the fingerprint names it
        model = load_model(path, tag=tag, device=str(device))
        tag_dir = path / "checkpoints" / tag if tag else path / "checkpoints"
        files = [p for p in tag_dir.rglob("*") if p.is_file()] if tag_dir.is_dir() else []
        fp = _files_fingerprint(files + [p for p in [path / "run_config.yaml"] if p.is_file()], extra=("run", tag))
    elif path.is_file():
        model = load_model(path, image_size=image_size, act=act, allow_torchscript=allow_torchscript)
        fp = _files_fingerprint([path], extra=("openai", image_size, act))
    else:
        raise FileNotFoundError(f"checkpoint {spec!r} is neither a run dir (run_config.yaml / checkpoints/) nor a file")
    return model.to(device).eval(), fp
