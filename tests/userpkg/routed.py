"""A model whose micro-batch picks one of two heads: on several ranks, one rank's head gets no gradient."""

import torch
import torch.nn as nn


class Routed(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(32, 16)
        self.a = nn.Linear(16, 2)
        self.b = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.a(h) if float(x[0, 0]) > 0 else self.b(h)  # the first input's sign routes the batch


def routed() -> nn.Module:
    return Routed()
