"""A small ResNet with BasicBlocks and BatchNorm, for low-resolution images (CIFAR-like)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.dropout(out)))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: list[int], blocks_per_stage: int, dropout: float):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, in_ch = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_ch, width, 2 if (stage > 0 and i == 0) else 1, dropout))
                in_ch = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))  # global average pool -> (B, num_classes)


def resnet(
    in_channels: int = 3,
    num_classes: int = 10,
    widths: list[int] | None = None,
    blocks_per_stage: int = 1,
    dropout: float = 0.0,
) -> ResNet:
    widths = [16, 32, 64] if widths is None else list(widths)  # an empty list is a mistake, not the default
    if not widths or min(widths) < 1 or min(in_channels, num_classes, blocks_per_stage) < 1:
        raise UserError(
            "resnet: widths must be a non-empty list of positive widths, and in_channels, num_classes and "
            "blocks_per_stage >= 1"
        )
    return ResNet(in_channels, num_classes, widths, blocks_per_stage, dropout)
