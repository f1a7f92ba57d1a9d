"""A language model built from torch's nn.TransformerEncoderLayer: its nn.MultiheadAttention reads
`out_proj.weight` itself, without calling `out_proj` (for compress.prune)."""

import torch
import torch.nn as nn


class EncoderLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, d_model)
        self.encoder = nn.TransformerEncoderLayer(d_model, 2, 2 * d_model, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(tokens)))


def encoder_lm(vocab_size: int = 32, d_model: int = 16) -> nn.Module:
    return EncoderLM(vocab_size, d_model)
