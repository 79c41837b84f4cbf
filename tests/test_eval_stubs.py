"""Stub CLIP towers (helpers, no tests) for pretrain.eval tests whose answers are known exactly.

The image tower undoes the eval normalisation and returns each image's mean RGB colour
in [0, 1]; the text tower looks each text up in a table of hand-chosen embeddings. So a
test fixes every image and text feature, hence the zero-shot or retrieval answer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pretrain.eval.datasets import ArrayImages, EvalDataset
from pretrain.eval.transforms import CLIP_MEAN, CLIP_STD


class TableTokenizer:
    """text -> row index of the table (shape [N, 1]). A text missing from the table takes
    the row of the first ``keywords`` entry it contains; anything else is an error."""

    def __init__(self, texts: Sequence[str], keywords: Sequence[str] = ()) -> None:
        self.index = {t: i for i, t in enumerate(texts)}
        self.keywords = list(keywords)

    def _row(self, text: str) -> int:
        if text in self.index:
            return self.index[text]
        for k in self.keywords:
            if k in text.split() or k + "." in text.split():
                return self.index[k]
        raise KeyError(text)

    def __call__(self, texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
        return torch.tensor([[self._row(t)] for t in texts], dtype=torch.long)


class ColourCLIP(nn.Module):
    image_size = 4
    context_length = 77

    def __init__(self, text_embeddings: Mapping[str, Sequence[float]], keywords: Sequence[str] = ()) -> None:
        super().__init__()
        self.texts = list(text_embeddings)
        self.keywords = list(keywords)
        self.register_buffer("table", torch.tensor([list(v) for v in text_embeddings.values()], dtype=torch.float32))
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.modes_seen: list[bool] = []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (images * std + mean).mean(dim=(2, 3))  # (B, 3) colour in [0, 1]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        return self.table[tokens[:, 0]]

    def tokenizer(self) -> TableTokenizer:
        return TableTokenizer(self.texts, self.keywords)


def colour_dataset(colours: Sequence[Sequence[int]], labels: Sequence[int], classnames: list[str],
                   name: str = "colours") -> EvalDataset:
    arrays = np.stack([np.full((4, 4, 3), c, dtype=np.uint8) for c in colours])
    return EvalDataset(name=name, images=ArrayImages(arrays), fingerprint=f"{name}-{len(colours)}",
                       classnames=classnames, labels=np.asarray(labels, dtype=np.int64)).set_image_size(4)
