"""The captioning baseline of the CLIP paper's efficiency experiment (arXiv 2103.00020,
Figure 2): CLIP's image tower and an autoregressive text decoder that cross-attends to the
image tower's tokens (decoder.py), trained with cross-entropy on the caption's tokens.

``forward(images, tokens)`` returns ``(logits [N, vocab], targets [N])`` for the N caption
positions that have a target in the batch (each row predicts tokens 1 .. EOT from the
tokens before them; padding after EOT is never a target), so the loss
(pretrain/loss/captioning.py) never builds the (B, context, vocab) tensor of a full
sequence. Rows are cut to the batch's longest caption first (the causal mask makes the
trailing padding irrelevant). Both cuts read the token ids back to the host (one sync per
forward on a GPU).

``caption_logprob(image_tokens, tokens)`` -> (B,) the log-likelihood of each caption, for
zero-shot classification (pretrain/eval/generative.py).

    model = create_model("ViT-tiny", objective="captioning")
    logits, targets = model(images, tokens)
"""
from __future__ import annotations

import torch

from .configs import CLIPConfig
from .decoder import TextDecoder
from .image_model import ImageTowerModel


def caption_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, targets, valid)``: decoder inputs ``tokens[:, :-1]``, targets
    ``tokens[:, 1:]`` and the mask of positions whose target is a caption token or the EOT
    (EOT = the row's highest id, as CLIP's tokenizer puts it last); rows cut to the batch's
    longest caption."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (batch, length >= 2), got shape {tuple(tokens.shape)}")
    eot = tokens.argmax(dim=-1)  # (B,)
    length = int(eot.max()) + 1 if tokens.shape[0] else 2
    tokens = tokens[:, :max(length, 2)]
    positions = torch.arange(tokens.shape[1] - 1, device=tokens.device)
    valid = positions.unsqueeze(0) < eot.unsqueeze(1)  # position j predicts token j + 1 <= EOT
    return tokens[:, :-1], tokens[:, 1:], valid


class CaptioningModel(ImageTowerModel):
    objective = "captioning"

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)
        t = config.text
        self.text_decoder = TextDecoder(t.vocab_size, t.context_length, t.width, t.layers, t.heads,
                                        memory_dim=config.embed_dim)
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, enabled: bool = True, image: bool = True, text: bool = True) -> None:
        if image:
            self.visual.grad_checkpointing = enabled
        if text:
            self.text_decoder.grad_checkpointing = enabled

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets, valid = caption_targets(tokens)
        hidden = self.text_decoder(inputs, self.image_tokens(images))
        return self.text_decoder.logits(hidden[valid]), targets[valid]

    def caption_logprob(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of log p(token | image, earlier tokens) over each row's caption tokens and
        its EOT, (B,) float32; ``image_tokens`` (B, N, D) or (1, N, D) for every row."""
        return self.token_logprobs(image_tokens, tokens).sum(dim=1)

    def token_logprobs(self, image_tokens: torch.Tensor, tokens: torch.Tensor,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
        """log p(tokens[:, j + 1] | image, tokens[:, :j + 1]) at each position j, (B, L' - 1)
        float32 with L' the batch's longest caption; zero outside ``positions`` (a bool mask
        of that shape, default every caption position up to the EOT): only those positions
        go through the vocabulary projection, the costly part."""
        inputs, targets, valid = caption_targets(tokens)
        if positions is not None:
            valid = valid & positions[:, :valid.shape[1]]
        hidden = self.text_decoder(inputs, image_tokens)[valid]  # (n, width)
        logits = self.text_decoder.logits(hidden).float()  # (n, vocab)
        picked = logits.gather(-1, targets[valid].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        out = torch.zeros(valid.shape, dtype=torch.float32, device=tokens.device)
        out[valid] = picked
        return out
