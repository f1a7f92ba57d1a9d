"""Optimizers (with no weight decay on biases and norm weights) and the LR schedule as a pure function."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import Config


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases, norm weights or other 1-D parameters."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: Config, model: nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW/Adam use torch's fused kernel where the parameters allow it: one kernel for all
    parameters, and it can skip a non-finite step on the device (`step_unless`) without a host sync.
    """
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    lr = cfg.train.lr
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    params = [p for g in groups for p in g["params"]]
    fused = fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return cls(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (0-d tensor) is 1.

    Fused Adam(W) reads `found_inf` on the device and leaves parameters, moments and step count
    untouched when it is set: no host sync. Other optimizers read the flag on the host (fused SGD's
    skip path initialises its momentum buffer from uninitialised memory, so it is not used).
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip
        optimizer.step()
        return
    if not bool(skip.item()):
        optimizer.step()


def lr_at(cfg: Config, step: int) -> float:
    """LR used by optimizer step `step` (0-based). Depends on the config alone, so a resumed run follows it exactly."""
    s, peak, total = cfg.schedule, cfg.train.lr, cfg.train.max_steps
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    if s.name == "constant":
        return peak
    if s.name == "step":
        return peak * s.gamma ** ((step - s.warmup_steps) // s.step_size)
    progress = min(1.0, (step - s.warmup_steps) / max(1, total - 1 - s.warmup_steps))
    floor = peak * s.min_lr_ratio
    if s.name == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
