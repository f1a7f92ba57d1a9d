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


class Normalised(nn.Module):
    """Inputs standardised by running statistics that training batches update (a RunningMeanStd, as in
    RL and physics models): unlike BatchNorm's, these buffers shape the training forward, each rank's
    its own under FSDP and ZeRO-1/2 (no buffer broadcast there)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        self.register_buffer("mean", torch.zeros(32))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.seen += 1
                self.mean.lerp_(x.mean(0), 1.0 / float(self.seen))
        return self.net(x - self.mean)


def normalised():
    return Normalised()
