"""A plain convolutional classifier: conv -> (BatchNorm) -> ReLU -> max-pool blocks, then a linear head."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError


class ConvBlock(nn.Module):
    """kernel_size conv (same padding), optional BatchNorm, ReLU, 2x2 max-pool (halves H and W), dropout."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, batch_norm: bool, pool: bool, dropout: float):
        super().__init__()
        # A bias before BatchNorm is cancelled by the mean subtraction: leave it out then.
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
        self.norm = nn.BatchNorm2d(out_ch) if batch_norm else nn.Identity()
        self.act = nn.ReLU()  # a module, not torch.relu: QAT fuses conv+bn+relu by module name
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.pool(self.act(self.norm(self.conv(x)))))


class CNN(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: list[int],
        kernel_size: int,
        batch_norm: bool,
        pool_every: int,
        dropout: float,
    ):
        super().__init__()
        widths = [in_channels] + channels
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, kernel_size, batch_norm, pool_every > 0 and (i + 1) % pool_every == 0, dropout)
            for i, (c_in, c_out) in enumerate(zip(widths, widths[1:]))
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) -> logits (B, num_classes)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))  # global average pool: any input resolution works

    def qat_fusion(self) -> list[list[str]]:
        """Module groups fused for quantization-aware training (compress.qat): conv(+bn)+relu per block."""
        groups = []
        for i, block in enumerate(self.blocks):
            norm = [f"blocks.{i}.norm"] if isinstance(block.norm, nn.BatchNorm2d) else []
            groups.append([f"blocks.{i}.conv", *norm, f"blocks.{i}.act"])
        return groups


def cnn(
    in_channels: int = 3,
    num_classes: int = 10,
    channels: list[int] | None = None,
    kernel_size: int = 3,
    batch_norm: bool = True,
    pool_every: int = 1,
    dropout: float = 0.0,
) -> CNN:
    """One block per entry of `channels` (default [32, 64]); every `pool_every`-th block max-pools (0: never)."""
    channels = [32, 64] if channels is None else list(channels)
    if not channels or min(channels) < 1 or kernel_size < 1 or kernel_size % 2 == 0:
        raise UserError("cnn: channels must be a non-empty list of positive widths and kernel_size an odd number")
    if pool_every < 0:
        raise UserError(f"cnn: pool_every must be >= 0 (0: never pool), got {pool_every}")
    return CNN(in_channels, num_classes, channels, kernel_size, batch_norm, pool_every, dropout)
