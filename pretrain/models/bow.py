"""The bag-of-words baseline of the CLIP paper's efficiency experiment (arXiv 2103.00020,
Figure 2): CLIP's image tower and a linear head from the image embedding to one logit per
vocabulary token. The target is the caption's normalised bag of words (each token between
SOT and EOT counts 1 / number of such tokens) and the loss a softmax cross-entropy over the
vocabulary against it (pretrain/loss/bow.py), as in the weakly supervised work the paper
compares to (Joulin et al. 2016, arXiv 1511.02251; Mahajan et al. 2018, arXiv 1805.00932).

``forward(images, tokens)`` returns ``(word_logits [B, vocab], tokens [B, L])``.

    model = create_model("ViT-tiny", objective="bow")
    word_logits, tokens = model(images, tokens)
    target = bag_of_words(tokens, model.vocab_size)       # (B, vocab), rows sum to 1 (or 0)
"""
from __future__ import annotations

import torch
from torch import nn

from .configs import CLIPConfig
from .image_model import ImageTowerModel


def bag_of_words(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Normalised bags (B, vocab_size) float32 of token rows (B, L): the tokens strictly
    between the SOT (position 0) and the EOT (the row's highest id), each 1/count; a row
    with no word is all zeros. Ids outside [0, vocab_size) raise."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}); got {int(tokens.min())}..{int(tokens.max())}")
    eot = tokens.argmax(dim=-1, keepdim=True)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    words = ((positions >= 1) & (positions < eot)).float()  # (B, L)
    bag = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    bag.scatter_add_(1, tokens, words)
    return bag / words.sum(dim=1, keepdim=True).clamp(min=1.0)


class BagOfWordsModel(ImageTowerModel):
    objective = "bow"

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)
        self.bow_head = nn.Linear(config.embed_dim, config.text.vocab_size)
        nn.init.normal_(self.bow_head.weight, std=config.embed_dim ** -0.5)
        nn.init.zeros_(self.bow_head.bias)
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, enabled: bool = True, image: bool = True, text: bool = True) -> None:
        if image:
            self.visual.grad_checkpointing = enabled

    def word_logits(self, images: torch.Tensor) -> torch.Tensor:
        """One logit per vocabulary token, (B, vocab_size)."""
        return self.bow_head(self.encode_image(images))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.word_logits(images), tokens
