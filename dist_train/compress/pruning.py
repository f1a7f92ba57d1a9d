"""Magnitude pruning during training (`compress.prune`), with torch.nn.utils.prune's reparametrisation.

At build time, before any transform or strategy wrapping, every pruned module gets an all-ones
mask (`prune.identity`): its parameter becomes `weight_orig`, its buffer `weight_mask`, and a
forward pre-hook computes `weight = weight_orig * weight_mask`. The model's own forward pre-hook
computes them all too: a parent that reads a child's `weight` without calling the child
(nn.MultiheadAttention's `out_proj`) would otherwise get the tensor of an earlier forward. The
state_dict keys are therefore the same from step 0 on, checkpoints hold the masks like any buffer,
and a resumed run continues with exactly the masks it saved.

Schedule (Zhu & Gupta 2017, "To prune, or not to prune"): the masks are recomputed at the start of
step t for t = start, start + every, ..., and at t = end, to sparsity
    s(t) = target * ramp((t - start) / (end - start)),  ramp(p) = 1 - (1 - p)^3 (cubic) or p (linear),
each tensor on its own (layer-wise): `unstructured` zeroes the round(s * numel) entries of smallest
|w| (L1), `structured` the round(s * size(dim)) slices along `dim` of smallest Ln norm. The ranking
uses the masked weight, so pruned entries stay pruned. After `end` the masks are fixed; the weights
they zero stay zero (their gradient is masked too).

Export folds the masks: `weight = weight_orig * weight_mask`, under the bare model's name.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.nn.utils import prune

from ..config import Config
from ..errors import UserError
from ..patterns import FUSED_NAMES, compile_pattern

log = logging.getLogger("dist_train")

ORIG, MASK = "weight_orig", "weight_mask"


def _module_types(names: list[str]) -> tuple[type, ...]:
    types = []
    for name in names:
        cls = getattr(nn, name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise UserError(f"compress.prune_modules: {name!r} is not a torch.nn module class (e.g. Linear, Conv2d)")
        types.append(cls)
    return tuple(types)


class Pruner:
    """Reparametrises the chosen modules of `model` (in place) and updates their masks on schedule."""

    def __init__(self, cfg: Config, model: nn.Module):
        c = cfg.compress
        self.structured = c.prune == "structured"
        self.target, self.ramp, self.norm, self.dim = c.prune_sparsity, c.prune_ramp, c.prune_norm, c.prune_dim
        self.start, self.every = c.prune_start_step, c.prune_every_steps
        self.end = c.prune_end_step if c.prune_end_step is not None else cfg.train.max_steps // 2
        types = _module_types(c.prune_modules)
        excluded = [compile_pattern(p, f"compress.prune_exclude[{i}]") for i, p in enumerate(c.prune_exclude)]
        seen: dict[int, int] = {}
        for _, param in model.named_parameters(remove_duplicate=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
        self.modules: list[tuple[str, nn.Module]] = []
        self.hooks: list[tuple[nn.Module, prune.BasePruningMethod]] = []
        fused = getattr(model, FUSED_NAMES, {})  # compress.qat: {"<conv>.bn.": "<the BatchNorm's own name>."}
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, types) or not isinstance(weight, nn.Parameter):
                continue
            own = fused.get(f"{name}.", f"{name}.")[:-1]  # a fused BatchNorm by its own name, as exported
            if any(matches(name) or matches(own) for matches in excluded):
                continue
            if own != name:
                raise UserError(
                    f"compress.prune would mask the BatchNorm {own}.weight, which compress.qat fuses into the conv "
                    "before it (a zero there divides that conv's output by zero): leave BatchNorm out of "
                    "compress.prune_modules (or exclude it), or set compress.qat=false"
                )
            if seen[id(weight)] > 1:  # a tied weight (e.g. LM head = embedding): masking one alias breaks the tie
                log.info("compress.prune: %s.weight is tied to another module; left unpruned", name)
                continue
            if self.structured and not -weight.dim() <= self.dim < weight.dim():
                raise UserError(f"compress.prune_dim={self.dim}: {name}.weight has only {weight.dim()} dimensions")
            if cfg.train.sync_batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise UserError(
                    f"compress.prune would mask the BatchNorm {name}.weight, which train.sync_batchnorm replaces: "
                    "leave BatchNorm out of compress.prune_modules (or exclude it), or set train.sync_batchnorm=false"
                )
            prune.identity(module, "weight")
            self.modules.append((name, module))
            hooks = module._forward_pre_hooks.values()
            self.hooks += [(module, hook) for hook in hooks if isinstance(hook, prune.BasePruningMethod)]
        if not self.modules:
            raise UserError(
                f"compress.prune: no module of type {', '.join(c.prune_modules)} to prune "
                "(check compress.prune_modules and compress.prune_exclude)"
            )
        model.register_forward_pre_hook(self._masked_weights)
        log.info(
            "compress.prune: %s pruning of %d modules to sparsity %g by step %d (%s ramp from step %d, every %d)",
            c.prune,
            len(self.modules),
            self.target,
            self.end,
            self.ramp,
            self.start,
            self.every,
        )

    def _masked_weights(self, model: nn.Module, args: tuple) -> None:
        """Every pruned `weight` from this forward's `weight_orig` and mask, before any module reads it."""
        for module, hook in self.hooks:
            hook(module, args)

    def sparsity_at(self, step: int) -> float | None:
        """The sparsity the masks get at the start of step `step`, or None when they are not updated then."""
        if step < self.start or step > self.end or ((step - self.start) % self.every and step != self.end):
            return None
        progress = 1.0 if self.end == self.start else (step - self.start) / (self.end - self.start)
        return self.target * (progress if self.ramp == "linear" else 1.0 - (1.0 - progress) ** 3)

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        sparsity = self.sparsity_at(step)
        if sparsity is None:
            return
        for _, module in self.modules:
            mask = getattr(module, MASK)
            weight = getattr(module, ORIG) * mask  # rank the masked weight: pruned entries stay pruned
            if self.structured:
                method = prune.LnStructured(sparsity, n=self.norm, dim=self.dim)
            else:
                method = prune.L1Unstructured(sparsity)
            mask.copy_(method.compute_mask(weight, mask))
        zeros = sum(int((getattr(m, MASK) == 0).sum()) for _, m in self.modules)
        total = sum(getattr(m, MASK).numel() for _, m in self.modules)
        log.info("step %d: pruning masks updated, sparsity %.4f (target now %.4f)", step, zeros / total, sparsity)

    def sparsity(self) -> dict[str, float]:
        """Each pruned module's fraction of masked weights."""
        return {name: float((getattr(m, MASK) == 0).float().mean()) for name, m in self.modules}


def fold_pruning(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`x.weight_orig` and `x.weight_mask` -> `x.weight = weight_orig * weight_mask` (key order kept).

    A `weight_orig` without a mask is not pruning's (torch's spectral_norm registers one): kept as it is."""
    out = {}
    for key, value in tensors.items():
        head, _, last = key.rpartition(".")
        prefix = f"{head}." if head else ""
        if last == ORIG and prefix + MASK in tensors:
            out[prefix + "weight"] = value * tensors[prefix + MASK].to(value.dtype)
        elif last != MASK or prefix + ORIG not in tensors:
            out[key] = value
    return out
