"""Multi-layer perceptron classifier/regressor (flattens its input, so it also takes images)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise UserError(f"unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, depth: int, output_dim: int, dropout: float, act: str):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * depth
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, d_out), activation(act), nn.Dropout(dropout))
            for d_in, d_out in zip(dims, dims[1:])
        )
        self.head = nn.Linear(dims[-1], output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, ...) -> (B, input_dim)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def qat_fusion(self) -> list[list[str]]:
        """Module groups fused for quantization-aware training (compress.qat): linear+relu per block.

        Other activations stay unfused; SiLU has no quantized kernel, so it cannot be converted to int8.
        """
        if self.blocks and isinstance(self.blocks[0][1], nn.SiLU):
            raise UserError("compress.qat: mlp activation silu/swish has no int8 kernel; use relu, gelu or tanh")
        return [
            [f"blocks.{i}.0", f"blocks.{i}.1"] for i, block in enumerate(self.blocks) if isinstance(block[1], nn.ReLU)
        ]


def mlp(
    input_dim: int = 32,
    hidden_dim: int = 128,
    depth: int = 2,
    num_classes: int = 4,
    dropout: float = 0.0,
    activation: str = "relu",
) -> MLP:
    """`num_classes` is the output width (use 1 for scalar regression or binary logits)."""
    if min(input_dim, hidden_dim, num_classes) < 1 or depth < 0:
        raise UserError("mlp: input_dim, hidden_dim and num_classes must be >= 1 and depth >= 0")
    return MLP(input_dim, hidden_dim, depth, num_classes, dropout, activation)
