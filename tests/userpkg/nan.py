"""A model whose output turns NaN on chosen forward calls: for the non-finite step guard."""

import torch
import torch.nn as nn


class NaNAt(nn.Module):
    def __init__(self, nan_calls: list[int], nan_from: int | None):
        super().__init__()
        self.linear = nn.Linear(32, 4)
        self.nan_calls, self.nan_from, self.calls = set(nan_calls), nan_from, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.linear(x)
        if self.calls in self.nan_calls or (self.nan_from is not None and self.calls >= self.nan_from):
            out = out * float("nan")
        return out


def nan_model(nan_calls: list[int] = (), nan_from: int | None = None) -> nn.Module:
    return NaNAt(list(nan_calls), nan_from)


class Loud(nn.Module):
    """An MLP whose outputs are `gain` times larger: its fp16 gradients overflow at a large loss scale."""

    def __init__(self, gain: float):
        super().__init__()
        from dist_train.models.mlp import mlp

        self.net, self.gain = mlp(hidden_dim=32, depth=1), gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.gain


def loud_mlp(gain: float = 300.0) -> nn.Module:
    return Loud(gain)
