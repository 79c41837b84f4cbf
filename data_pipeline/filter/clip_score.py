"""Image-text cosine similarity with a checkpoint of this project, batched (optional rule).

The checkpoint is either an OpenAI-layout state-dict file (``torch.save(sd, path)``) or a
training run directory, both read weights-only by ``pretrain.modelio.load_model`` (a
TorchScript archive only with ``clip_score.allow_torchscript_code``). Torch and the model code are imported
only when the rule is switched on, so the filter runs without them otherwise.

    scorer = ClipScorer.from_config(cfg.clip_score)
    scores = scorer.score([pil_rgb_image, ...], ["a caption", ...])   # np.ndarray of cosines
"""
from __future__ import annotations

import os
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from data_pipeline.filter.config import ClipScoreConfig

CLIP_SCORE = "filter/clip_score"

_CACHE: dict[tuple[str, str, str], "ClipScorer"] = {}


def load_checkpoint_model(checkpoint: str, tag: str = "", device: str = "cpu",
                          allow_torchscript: bool = False) -> Any:
    """The CLIP model of a state-dict file (local or fsspec URL) or a run directory, in eval
    mode on ``device``, read weights-only by pretrain.modelio."""
    from pretrain.modelio import TorchScriptRefused, load_model

    # "hf:DIR" is a local Hugging Face CLIP dir (never fsspec's hub protocol "hf://")
    if not os.path.isdir(checkpoint) and not checkpoint.startswith("hf:"):
        fs, path = fsspec.core.url_to_fs(checkpoint)
        if not fs.isfile(path):
            raise FileNotFoundError(f"clip_score.checkpoint: no such state-dict file or run directory: {checkpoint}")
    try:
        return load_model(checkpoint, tag=tag or None, device=device, allow_torchscript=allow_torchscript)
    except TorchScriptRefused as e:
        raise TorchScriptRefused(f"clip_score.checkpoint: {e}; set clip_score.allow_torchscript_code=true "
                                 "to accept it") from e


class ClipScorer:
    def __init__(self, model: Any, tokenizer: Any, device: str, batch_size: int = 64):
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size
        from pretrain.data.transforms import eval_transform

        # The same preprocessing as zero-shot evaluation: shorter side -> S (bicubic),
        # centre crop, CLIP mean/std.
        self.transform = eval_transform(int(model.image_size))
        self.context_length = int(model.context_length)

    @classmethod
    def from_config(cls, cfg: ClipScoreConfig) -> "ClipScorer":
        """One scorer per process and checkpoint (a worker filters many tars)."""
        import torch

        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        key = (os.path.abspath(cfg.checkpoint), cfg.tag, device)
        if key not in _CACHE:
            from pretrain.tokenizer import default_tokenizer

            model = load_checkpoint_model(cfg.checkpoint, cfg.tag, device, cfg.allow_torchscript_code)
            _CACHE[key] = cls(model, default_tokenizer(), device, cfg.batch_size)
        scorer = _CACHE[key]
        scorer.batch_size = cfg.batch_size
        return scorer

    def score(self, images: list[Image.Image], captions: list[str]) -> np.ndarray:
        """Cosine between each image and its caption, float64 [N]."""
        import torch

        out = np.zeros(len(images), dtype=np.float64)
        for i in range(0, len(images), self.batch_size):
            imgs = images[i: i + self.batch_size]
            caps = captions[i: i + self.batch_size]
            x = torch.stack([self.transform(im) for im in imgs]).to(self.device)
            tokens = self.tokenizer(caps, context_length=self.context_length).to(self.device)
            with torch.inference_mode():
                fi = self.model.encode_image(x).float()
                ft = self.model.encode_text(tokens).float()
            fi = fi / fi.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            ft = ft / ft.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out[i: i + len(imgs)] = (fi * ft).sum(-1).cpu().double().numpy()
        return out
