"""GPT-style decoder-only language model (pre-norm blocks, causal SDPA attention, tied embeddings)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..fused_loss import LMHead


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(batch, seq, self.n_heads, width // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, seq, width)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    supports_fused_loss = True  # forward(tokens, targets=...) returns the summed loss (train.fused_loss)

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        mlp_ratio: int,
        dropout: float,
        low_precision_residual: bool = False,
    ):
        super().__init__()
        self.seq_len = seq_len
        self.low_precision_residual = low_precision_residual
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = LMHead(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying (GPT-2)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab); with targets (B, T), the cross-entropy summed over
        the counted tokens instead, computed by the output projection a chunk at a time (fused_loss.py)."""
        if tokens.shape[-1] > self.seq_len:  # a shape, not a value: no device sync
            raise UserError(
                f"transformer_lm: the data's sequences of {tokens.shape[-1]} tokens are longer than model.seq_len "
                f"({self.seq_len}): raise model.seq_len, or shorten the data's sequences (data.seq_len for "
                "synthetic_tokens, data.block_size for hf)"
            )
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        if self.low_precision_residual:
            device = x.device.type
            if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
                # the blocks add their bf16/fp16 outputs to a stream of that dtype, not fp32: the residual adds
                # and LayerNorms move half the bytes (as bf16 parameters would); LayerNorm still computes in fp32
                x = x.to(torch.get_autocast_dtype(device))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x) if targets is None else self.lm_head(x, targets, label_smoothing)


def transformer_lm(
    vocab_size: int = 256,
    seq_len: int = 64,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
    low_precision_residual: bool = False,
) -> TransformerLM:
    if min(vocab_size, seq_len, d_model, n_heads, mlp_ratio) < 1 or n_layers < 0:
        raise UserError(
            "transformer_lm: vocab_size, seq_len, d_model, n_heads and mlp_ratio must be >= 1 and n_layers >= 0"
        )
    if d_model % n_heads:
        raise UserError(f"transformer_lm: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    return TransformerLM(vocab_size, seq_len, d_model, n_layers, n_heads, mlp_ratio, dropout, low_precision_residual)
