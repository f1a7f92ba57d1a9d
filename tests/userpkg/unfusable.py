"""A model whose qat_fusion() declares a group torch cannot fuse, Linear + GELU (for compress.qat)."""

import torch
import torch.nn as nn


class Unfusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x)))

    def qat_fusion(self) -> list[list[str]]:
        return [["fc", "act"]]


def unfusable() -> nn.Module:
    return Unfusable()
