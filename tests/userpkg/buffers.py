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


class Rotary(nn.Module):
    """Rotary position factors kept as a persistent complex buffer (as LLaMA-style code's `freqs_cis`)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(32, 4)
        self.register_buffer("freqs_cis", torch.polar(torch.ones(4), torch.arange(4.0)))
        self.register_buffer("phases", torch.polar(torch.ones(2), torch.arange(2.0)).to(torch.complex128))
        self.register_buffer("ids", torch.arange(4).to(torch.uint16))

    def forward(self, x):
        return self.net(x) * self.freqs_cis.real


def rotary():
    return Rotary()


class Float64Scale(nn.Module):
    """An fp64 parameter among fp32 weights (a precision-sensitive scale kept in double)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(32, 4)
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x):
        return (self.net(x) * self.scale).float()


def float64_scale():
    return Float64Scale()


class ClampedBatchNorm(nn.BatchNorm1d):
    """A BatchNorm1d subclass with a forward of its own (train.sync_batchnorm cannot convert it)."""

    def forward(self, x):
        return super().forward(x).clamp(-3, 3)


def clamped_batchnorm():
    return nn.Sequential(nn.Linear(32, 8), ClampedBatchNorm(8), nn.Linear(8, 4))
