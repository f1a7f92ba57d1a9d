"""Weights tied across blocks (ALBERT-style sharing): FSDP2 lets one unit only manage a parameter."""

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.lin(x))


class TiedBlocks(nn.Module):
    """blocks[0] and blocks[2] share their weight; blocks[1]'s is the root's `proj` weight."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 16)
        self.blocks = nn.ModuleList([Block(16) for _ in range(4)])
        self.blocks[2].lin.weight = self.blocks[0].lin.weight
        self.proj = nn.Linear(16, 16)
        self.blocks[1].lin.weight = self.proj.weight
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(self.proj(h))


def tied_blocks():
    return TiedBlocks()
