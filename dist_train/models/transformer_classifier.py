"""Transformer encoder classifier over token sequences (pre-norm blocks, SDPA attention).

Token `pad_id` (default 0) is padding wherever it occurs: padded keys are masked out of attention
and padded positions out of the mean pooling, and positions count real tokens only, so a sequence's
logits do not depend on its padding (left, right or both).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
        )
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # keep: (B, 1, 1, T) bool keys
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.n_heads, width // self.n_heads).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout)
        x = x + self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, seq, width)))
        return x + self.resid_dropout(self.mlp(self.ln2(x)))


class TransformerClassifier(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_len: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        mlp_ratio: int,
        dropout: float,
        pad_id: int,
        pooling: str,
    ):
        super().__init__()
        self.pad_id, self.pooling, self.max_len = pad_id, pooling, max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len + (pooling == "cls"), d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if pooling == "cls" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, T) -> logits (B, num_classes)
        if tokens.shape[1] > self.max_len:  # a shape, not a value: no device sync
            raise UserError(
                f"transformer_classifier: the data's sequences of {tokens.shape[1]} tokens are longer than "
                f"model.max_len ({self.max_len}): raise model.max_len, or shorten the data's sequences"
            )
        keep = tokens != self.pad_id  # (B, T)
        # Positions count real tokens only, so padding in front (or inside) shifts no token's position.
        positions = (keep.cumsum(dim=1) - 1).clamp(min=0)
        x = self.tok_emb(tokens)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
            keep = torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1)
            positions = torch.cat([positions.new_zeros(positions.shape[0], 1), positions + 1], dim=1)
        else:
            # A row that is all padding would give every query no key (NaN softmax): let it see position 0.
            keep = keep.clone()
            keep[:, 0] |= ~keep.any(dim=1)
        x = self.drop(x + self.pos_emb(positions))
        attn_keep = keep[:, None, None, :]  # broadcast over heads and queries
        for block in self.blocks:
            x = block(x, attn_keep)
        x = self.ln_f(x)
        if self.cls is not None:
            return self.head(x[:, 0])
        weights = keep.unsqueeze(-1).to(x.dtype)
        return self.head((x * weights).sum(dim=1) / weights.sum(dim=1))  # mean over real tokens


def transformer_classifier(
    vocab_size: int = 256,
    num_classes: int = 2,
    max_len: int = 128,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
    pad_id: int = 0,
    pooling: str = "mean",
) -> TransformerClassifier:
    """`pooling`: mean (over non-padding tokens) or cls (a learned token prepended to every sequence)."""
    if min(vocab_size, num_classes, max_len, d_model, n_heads, mlp_ratio) < 1 or n_layers < 0:
        raise UserError(
            "transformer_classifier: vocab_size, num_classes, max_len, d_model, n_heads and mlp_ratio must be >= 1 "
            "and n_layers >= 0"
        )
    if d_model % n_heads:
        raise UserError(f"transformer_classifier: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    if pooling not in ("mean", "cls"):
        raise UserError(f"transformer_classifier: pooling must be mean or cls, got {pooling!r}")
    return TransformerClassifier(
        vocab_size, num_classes, max_len, d_model, n_layers, n_heads, mlp_ratio, dropout, pad_id, pooling
    )
