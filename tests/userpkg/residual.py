"""Models that declare qat_fusion() but have no int8 form (for compress.qat): one adds two tensors,
an op without a quantized CPU kernel; one starts with an Embedding, which the QAT qconfig cannot convert."""

import torch
import torch.nn as nn


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.fc, self.head = nn.Linear(32, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        return self.head(x + self.fc(x))

    def qat_fusion(self) -> list[list[str]]:
        return []


def residual() -> nn.Module:
    return Residual()


class EmbeddingLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(32, 16), nn.Linear(16, 32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tokens))

    def qat_fusion(self) -> list[list[str]]:
        return []


def embedding_lm() -> nn.Module:
    return EmbeddingLM()
