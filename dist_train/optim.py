"""Optimizers (per-module LR/weight-decay rules; no weight decay on biases and norm weights by default).
The LR schedule lives in schedules.py (`lr_at` is re-exported here)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import Config
from .patterns import FUSED_NAMES, canonical_name, compile_pattern
from .schedules import lr_at  # noqa: F401 - re-exported: the schedule used to live here

log = logging.getLogger("dist_train")


def resolve_param_groups(model: nn.Module, weight_decay: float, rules: list[dict] = ()) -> list[tuple[str, dict, list]]:
    """(label, optimizer group, parameter names) for each non-empty group, in optimizer order.

    `rules` are `optim.param_groups`: the first rule whose `match` fits a parameter's bare name takes
    it, with the rule's `lr_scale` and, when the rule sets it, its `weight_decay` for every parameter
    it matches. Parameters no rule sets a decay for follow the default: decay matrices and
    embeddings, never biases, norm weights or other 1-D parameters.
    """
    matchers = [compile_pattern(rule["match"], f"optim.param_groups[{i}].match") for i, rule in enumerate(rules)]
    buckets: dict[tuple[int, bool], tuple[list, list]] = {}  # (rule index or len(rules), decays) -> params, names
    fused = getattr(model, FUSED_NAMES, None)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bare = canonical_name(name, fused)
        index = next((i for i, matches in enumerate(matchers) if matches(bare)), len(rules))
        own_decay = index < len(rules) and "weight_decay" in rules[index]  # one group: the rule's decay
        params, names = buckets.setdefault((index, own_decay or param.dim() >= 2), ([], []))
        params.append(param)
        names.append(bare)
    out, quiet = [], dist.is_initialized() and dist.get_rank() != 0  # every rank builds one: rank 0 warns
    for index in range(len(rules) + 1):
        rule = rules[index] if index < len(rules) else {}
        for decays in (True, False):
            if (index, decays) not in buckets:
                continue
            params, names = buckets[(index, decays)]
            decay = rule.get("weight_decay", weight_decay if decays else 0.0)
            group = {"params": params, "weight_decay": decay}
            if rule:
                group["lr_scale"] = rule.get("lr_scale", 1.0)
            label = f"rule {index} `{rule['match']}`" if rule else "default"
            out.append((label, group, names))
        if rule and not any(key[0] == index for key in buckets) and not quiet:
            log.warning("optim.param_groups[%d] (match %r) matched no parameter", index, rule["match"])
    return out


def _describe(resolved: list[tuple[str, dict, list]]) -> str:
    lines = []
    for i, (label, group, names) in enumerate(resolved):
        shown = ", ".join(names[:4]) + (f", ... (+{len(names) - 4} more)" if len(names) > 4 else "")
        size = sum(p.numel() for p in group["params"])
        lines.append(
            f"  group {i} ({label}): lr x{group.get('lr_scale', 1.0):g}, weight_decay {group['weight_decay']:g}, "
            f"{len(names)} tensors, {size:,} elements: {shown}"
        )
    return "\n".join(lines)


def build_optimizer(cfg: Config, model: nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW/Adam use torch's fused kernel where the parameters allow it: one kernel for all
    parameters, and it can skip a non-finite step on the device (`step_unless`) without a host sync.
    """
    o = cfg.optim
    resolved = resolve_param_groups(model, o.weight_decay, o.param_groups)
    if o.param_groups:  # rank 0 logs info: printed once
        log.info("optimizer parameter groups (optim.param_groups):\n%s", _describe(resolved))
    groups = [{**group, "names": names} for _, group, names in resolved]  # checkpoints: which parameters a group held
    lr = cfg.train.lr
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
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
