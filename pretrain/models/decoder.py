"""An autoregressive Transformer text decoder with cross-attention to image tokens: the
captioning baseline's text side (CLIP paper, arXiv 2103.00020, Section 2.3 and Figure 2;
VirTex, arXiv 2006.06666).

token + learned positional embedding -> ``nn.TransformerDecoderLayer`` x layers (pre-norm: causal
self-attention, cross-attention to the image tokens, MLP ratio 4, GELU) -> LayerNorm ->
logits through the token embedding's transposed weight (tied input/output embedding, which
keeps the vocabulary-sized matrix to one copy).

    dec = TextDecoder(vocab_size=49408, context_length=77, width=64, layers=2, heads=1, memory_dim=64)
    hidden = dec(tokens[:, :-1], image_tokens)       # (B, L-1, width); position i sees tokens <= i
    logits = dec.logits(hidden)                       # (..., vocab_size)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class TextDecoder(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 memory_dim: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder width {width} is not divisible by heads {heads}")
        self.context_length = context_length
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        # image tokens live in the image tower's output space; the decoder attends in its own width
        self.memory_proj = nn.Linear(memory_dim, width)
        # independent layers (nn.TransformerDecoder would deep-copy one layer: equal inits)
        self.layers = nn.ModuleList([
            nn.TransformerDecoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, width) of ``tokens`` (B, L) given ``image_tokens`` (B, N, D)
        (or (1, N, D), shared by every row)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"token sequences of length {length} exceed the context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length].to(self.token_embedding.weight.dtype)
        memory = self.memory_proj(image_tokens.to(x.dtype))
        if memory.shape[0] == 1 and x.shape[0] != 1:
            memory = memory.expand(x.shape[0], -1, -1)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointing:  # non-reentrant, as the towers (pretrain/models/layers.py)
                x = checkpoint(layer, x, memory, mask, use_reentrant=False, tgt_is_causal=True)
            else:
                x = layer(x, memory, tgt_mask=mask, tgt_is_causal=True)
        return self.ln_final(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits over the vocabulary from hidden states (..., width)."""
        return F.linear(hidden, self.token_embedding.weight)
