"""DistributedDataParallel (and plain single-process training at world size 1)."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from ..optim import build_optimizer
from .base import Strategy

# DDP's reducer takes the cap in bytes as a C++ int64: from 2**43 MiB on (8.8e12) its set-up failed with a
# TypeError. Any cap past the model's size is one bucket, so a larger one is taken as this one.
MAX_BUCKET_CAP_MB = 2**42


def fp32(tensor: torch.Tensor) -> torch.Tensor:
    """A floating tensor in fp32, a complex one in complex64 (two fp32 parts); others keep their dtype."""
    if tensor.is_floating_point():
        return tensor.detach().float()
    return tensor.detach().to(torch.complex64) if tensor.is_complex() else tensor.detach()


def fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors to fp32, everything on the CPU (integer buffers keep their dtype)."""
    return {k: fp32(v).cpu().contiguous() for k, v in state.items()}


class UnusedParameters(UserError):
    """Parameters that got no gradient in a step under DDP without `strategy.find_unused_parameters`:
    this rank's verdict (another rank's batch may have used them; that rank fails on the connection)."""


class DDPStrategy(Strategy):
    name = "ddp"
    _check_unused = False  # until the first step: DDP without find_unused_parameters, several ranks

    def setup(self, model: nn.Module) -> None:
        self._module = model.to(self.ctx.device)
        if self.ctx.world_size > 1:
            cuda = self.ctx.device.type == "cuda"
            self.model = DistributedDataParallel(
                self._module,
                device_ids=[self.ctx.device.index] if cuda else None,
                bucket_cap_mb=min(self.cfg.strategy.bucket_cap_mb, MAX_BUCKET_CAP_MB),
                find_unused_parameters=self.cfg.strategy.find_unused_parameters,
                gradient_as_bucket_view=True,  # grads live in the buckets: no extra copy per step
            )
            self._check_unused = not self.cfg.strategy.find_unused_parameters
        else:
            self.model = self._module
        self.optimizer = build_optimizer(self.cfg, self._module)
        fp16 = self.cfg.train.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=fp16) if fp16 else None
        self._rebuild_buckets = False

    @property
    def module(self) -> nn.Module:
        return self._module

    def prepare_step(self, inputs: torch.Tensor, loss_of, model_kwargs: dict) -> None:
        """A resumed run's first step reduces the gradients in the buckets the uninterrupted run had.

        DDP reduces its first synchronised backward in one bucket in parameter order, then rebuilds the
        buckets in the order the gradients became ready; at 3 or more ranks an element's sum depends on
        its place in the bucket (gloo's ring), so the first step after a resume summed in another order
        than the uninterrupted run (weights 3e-8 apart, no longer bit-exact). One forward and backward
        of a zero loss on the step's first micro-batch, synchronised, lets DDP record that order first;
        gradients, buffers (BatchNorm statistics) and the random streams are left as they were.
        """
        if not self._rebuild_buckets:
            return
        self._rebuild_buckets = False
        buffers = [b.detach().clone() for b in self._module.buffers()]
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.ctx.device.type):
            with self.autocast():
                outputs = self.model(inputs, **model_kwargs)
            (loss_of(outputs) * 0).backward()
        with torch.no_grad():
            for buffer, value in zip(self._module.buffers(), buffers):
                buffer.copy_(value)
        self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self) -> ContextManager:
        if isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        self.unscale_gradients()  # clip the true gradients, not the scaled ones
        return torch.nn.utils.clip_grad_norm_(self._module.parameters(), max_norm, foreach=True)

    def grad_norm(self) -> torch.Tensor:
        self.unscale_gradients()  # fp16: the true gradients (get_scale() would read the scale on the host)
        grads = [p.grad for p in self._module.parameters() if p.grad is not None]
        norms = torch._foreach_norm(grads)
        return torch.linalg.vector_norm(torch.stack(norms))

    def clip_and_step(self, max_norm: float | None, clip_value: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._check_unused:  # the first step only (a host check): DDP reduced no bucket that holds one
            self._check_unused = False  # of these, so the ranks step apart, and its next forward raises
            unused = [name for name, p in self._module.named_parameters() if p.requires_grad and p.grad is None]
            if unused:
                raise UnusedParameters(
                    f"rank {self.ctx.rank}: parameters got no gradient in the first step ({', '.join(unused[:3])}"
                    f"{', ...' if len(unused) > 3 else ''}): DDP needs strategy.find_unused_parameters=true for a "
                    "model that leaves some unused in a step (or freeze them: requires_grad=False)"
                )
        return super().clip_and_step(max_norm, clip_value)

    def save(self, folder: Path) -> list[str]:
        if not self.ctx.is_rank_zero:  # replicated state: rank 0 writes it once
            return []
        torch.save(self._module.state_dict(), folder / "model.pt")
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, folder / "optimizer.pt")
        return ["model.pt", "optimizer.pt"]

    def load(self, folder: Path) -> None:
        model_state = torch.load(folder / "model.pt", map_location=self.ctx.device, weights_only=True)
        self._module.load_state_dict(model_state)
        # DDP's bucket order comes from its first backward (prepare_step); it never rebuilds them when
        # it finds unused parameters
        ddp = isinstance(self.model, DistributedDataParallel)
        self._rebuild_buckets = ddp and not self.cfg.strategy.find_unused_parameters
        state = torch.load(folder / "optimizer.pt", map_location=self.ctx.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return fp32_cpu(self._module.state_dict()) if self.ctx.is_rank_zero else None
