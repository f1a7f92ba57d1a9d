"""Temporal convolutional network (Bai et al. 2018, arXiv:1803.01271): stacked dilated causal
convolutions with residual connections, for sequence classification or regression.

Inputs are channels-last sequences `(B, T, input_dim)` of floats (`(B, T)` when input_dim is 1),
or token ids `(B, T)` when `vocab_size` is set. Output step t depends on input steps <= t only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

POOLINGS = ("last", "mean", "none")


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only, so no output step sees the future."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C', T)
        left = (self.kernel_size[0] - 1) * self.dilation[0]
        return super().forward(F.pad(x, (left, 0)))


class TemporalBlock(nn.Module):
    """Two dilated causal convs (ReLU, dropout) plus a residual path (1x1 conv when widths differ)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.conv1 = CausalConv1d(in_ch, out_ch, kernel_size, dilation=dilation)
        self.conv2 = CausalConv1d(out_ch, out_ch, kernel_size, dilation=dilation)
        self.dropout = nn.Dropout(dropout)
        self.residual = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(torch.relu(self.conv1(x)))
        out = self.dropout(torch.relu(self.conv2(out)))
        return torch.relu(out + self.residual(x))


class TCN(nn.Module):
    def __init__(
        self,
        input_dim: int,
        num_outputs: int,
        channels: int,
        num_levels: int,
        kernel_size: int,
        dropout: float,
        vocab_size: int | None,
        pooling: str,
    ):
        super().__init__()
        self.pooling = pooling
        self.embed = nn.Embedding(vocab_size, input_dim) if vocab_size else None
        # Dilation doubles per level: the receptive field is 1 + 2 (kernel_size - 1) (2^levels - 1) steps.
        self.blocks = nn.ModuleList(
            TemporalBlock(input_dim if i == 0 else channels, channels, kernel_size, 2**i, dropout)
            for i in range(num_levels)
        )
        self.head = nn.Linear(channels, num_outputs)
        self.receptive_field = 1 + 2 * (kernel_size - 1) * (2**num_levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)  # (B, T) ids -> (B, T, input_dim)
        elif x.dim() == 2:
            x = x.unsqueeze(-1)  # (B, T) -> (B, T, 1)
        x = x.transpose(1, 2)  # channels-last -> (B, C, T) for Conv1d
        for block in self.blocks:
            x = block(x)
        if self.pooling == "last":  # causal: the last step has seen the whole receptive field
            return self.head(x[:, :, -1])  # (B, num_outputs)
        if self.pooling == "mean":
            return self.head(x.mean(dim=2))
        return self.head(x.transpose(1, 2))  # (B, T, num_outputs): one prediction per step


def tcn(
    input_dim: int = 1,
    num_outputs: int = 1,
    channels: int = 32,
    num_levels: int = 4,
    kernel_size: int = 3,
    dropout: float = 0.0,
    vocab_size: int | None = None,
    pooling: str = "last",
) -> TCN:
    """`num_outputs`: classes (cross_entropy) or regression targets; `pooling`: last, mean or none (per step)."""
    if pooling not in POOLINGS:
        raise UserError(f"tcn: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if min(input_dim, num_outputs, channels, num_levels, kernel_size) < 1:
        raise UserError("tcn: input_dim, num_outputs, channels, num_levels and kernel_size must be >= 1")
    return TCN(input_dim, num_outputs, channels, num_levels, kernel_size, dropout, vocab_size, pooling)
