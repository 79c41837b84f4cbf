"""CLIP's causal text transformer: token + learned positional embedding -> causal
pre-norm transformer -> ln_final -> features at the end-of-text token (the highest token
id of each row, as in OpenAI's CLIP) -> ``@ text_projection``.

OpenAI's key layout puts the text tower's parameters at the top level of the model
(``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``,
``text_projection``), so this is a mixin that adds them to ``clip.CLIP`` rather than a
submodule (a submodule would prefix every key).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import LayerNorm, Transformer


class TextTowerMixin:
    """Mix into an ``nn.Module`` and call ``_init_text_tower`` from its ``__init__``."""

    token_embedding: nn.Embedding
    positional_embedding: nn.Parameter
    transformer: Transformer
    ln_final: LayerNorm
    text_projection: nn.Parameter

    def _init_text_tower(self, context_length: int, vocab_size: int, width: int, layers: int,
                         heads: int, output_dim: int, act: str) -> None:
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, act=act, causal=True)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def text_hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-position outputs of ln_final, (B, L, W); position i sees only tokens <= i.
        Rows shorter than the context length are allowed (the causal mask makes trailing
        padding irrelevant to earlier positions)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}")
        length, context_length = tokens.shape[1], self.positional_embedding.shape[0]
        if length > context_length:
            raise ValueError(f"token sequences of length {length} exceed the context "
                             f"length {context_length}")
        x = self.token_embedding(tokens)  # (B, L, W)
        x = x + self.positional_embedding[:length].to(x.dtype)
        return self.ln_final(self.transformer(x))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised projected text features, (B, embed_dim)."""
        x = self.text_hidden_states(tokens)
        eot = tokens.argmax(dim=-1)  # <|endoftext|> has the largest id in CLIP's vocab
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)
        return x @ self.text_projection.to(x.dtype)
