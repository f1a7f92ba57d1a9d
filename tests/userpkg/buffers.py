"""A model whose forward multiplies activations by an fp32 buffer between two Linears."""

import torch
import torch.nn as nn


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 16)
        self.out = nn.Linear(16, 4)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))  # fp32: mixed precision casts no buffer

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)) * self.scale)


def scaled():
    return Scaled()
