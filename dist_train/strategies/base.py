"""The strategy interface: everything the shared loop needs from a parallelism strategy.

The loop calls only these methods; strategy-specific behaviour (DDP buckets, DeepSpeed's
engine, FSDP's sharding, loss scaling) stays behind them.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config
from ..distributed import DistContext
from ..optim import step_unless

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def ensure_process_group(device: torch.device) -> bool:
    """DeepSpeed and FSDP2 need a process group even alone: make a one-rank group in memory.

    Returns True when it made one (the strategy's teardown destroys it).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def param_dtypes(model: nn.Module) -> dict[torch.dtype, str]:
    """The floating dtypes of the model's parameters, each with the name of its first parameter."""
    found: dict[torch.dtype, str] = {}
    for name, param in model.named_parameters():
        if param.is_floating_point():
            found.setdefault(param.dtype, name)
    return found


def require_one_param_dtype(model: nn.Module, strategy: str) -> None:
    """FSDP2 and ZeRO flatten or shard parameters per dtype-uniform group: a model with parameters of
    several floating dtypes (an fp64 scale among fp32 weights) failed their set-up or first step with
    an AssertionError, or trained in another dtype than its own."""
    from ..errors import UserError, on_every_rank

    found = param_dtypes(model)
    if len(found) > 1:
        listed = ", ".join(f"{str(dtype).removeprefix('torch.')} ({name}, ...)" for dtype, name in found.items())
        raise on_every_rank(
            UserError(
                f"strategy.name={strategy} needs the model's parameters in one floating dtype, the model has "
                f"{listed}: cast them to one in the factory (e.g. `model.float()`), or use strategy.name=ddp"
            )
        )


def refuse_scalar_parameters(model: nn.Module, strategy: str, why: str) -> None:
    """FSDP2 and DeepSpeed cannot take a 0-dimensional parameter (a learnable scalar: a temperature, a
    logit scale): one line before their set-up fails with a traceback, at any world size."""
    names = [name for name, param in model.named_parameters() if param.dim() == 0]
    if names:
        from ..errors import UserError

        shown = ", ".join(names[:3]) + (f", ... ({len(names)} parameters)" if len(names) > 3 else "")
        raise UserError(
            f"strategy.name={strategy} cannot take 0-dimensional parameters ({shown}): {why}; make each a 1-D "
            "tensor of one element (nn.Parameter(torch.ones(1))), or use strategy.name=ddp"
        )


class Strategy:
    """Wraps one model and its optimizer for one parallelism scheme."""

    name = "base"
    reshards = True  # can load a checkpoint written at another world size
    scaler = None  # fp16's GradScaler, where the strategy scales the loss itself (ddp, fsdp)
    _unscaled = False  # the scaler has divided this step's gradients already

    def __init__(self, cfg: Config, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.model: nn.Module  # what the loop calls forward on
        self.optimizer: torch.optim.Optimizer

    # --- set-up ---------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """UserError for a model this strategy cannot take (its set-up's first act; `dist-train check`
        calls it too, on the model it builds, possibly on the meta device)."""

    def setup(self, model: nn.Module) -> None:
        """Move/shard/wrap `model` and build the optimizer over its (possibly sharded) parameters."""
        raise NotImplementedError

    @property
    def module(self) -> nn.Module:
        """The bare model (no wrapper), for its config-independent structure and metrics."""
        raise NotImplementedError

    # --- one step ---------------------------------------------------------------------------
    def prepare_step(self, inputs: torch.Tensor, loss_of, model_kwargs: dict) -> None:
        """Before each optimizer step's first forward, with its first micro-batch (on the device),
        `loss_of(outputs)` and the model's other forward arguments (the targets under train.fused_loss):
        strategy bookkeeping a resumed run must redo before it trains (DDP)."""

    def autocast(self) -> ContextManager:
        dtype = PRECISION_DTYPES.get(self.cfg.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=dtype)

    def no_sync(self) -> ContextManager:
        """Context for the forward and backward of accumulation micro-steps: no gradient sync."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def own_gradients(self) -> None:
        """Give each gradient memory of its own (a copy), after an accumulating step's first backward.

        Under CUDA graphs a backward's gradients live in the graphs' memory pool, and autograd makes
        them `.grad` as they are; the next micro-step's replay would overwrite them before it adds its
        own. Copied once, every later micro-step adds into them in place."""
        for param in self.module.parameters():
            if param.grad is not None:
                param.grad = param.grad.clone()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm; return the norm before clipping (a device tensor)."""
        raise NotImplementedError

    def grad_norm(self) -> torch.Tensor:
        """Global gradient norm without clipping (every step when train.grad_clip_norm is null)."""
        return self.clip_grad_norm(float("inf"))

    def clip_grad_value(self, value: float) -> None:
        self.unscale_gradients()
        torch.nn.utils.clip_grad_value_(self.module.parameters(), value)

    def unscale_gradients(self) -> None:
        """fp16: divide this step's gradients by the loss scale, once, before any clipping (the
        scaler refuses a second unscale_ in the same step)."""
        if self.scaler is not None and not self._unscaled:
            self.scaler.unscale_(self.optimizer)
            self._unscaled = True

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def clip_and_step(self, max_norm: float | None, clip_value: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip (norm, then value), step unless the gradient norm is not finite, zero the gradients.

        Returns the pre-clip global gradient norm and a 0-d flag (1.0: the step was skipped), both
        on the device: nothing here reads a device value on the host.
        """
        grad_norm = self.clip_grad_norm(max_norm) if max_norm else self.grad_norm()
        if clip_value:
            self.clip_grad_value(clip_value)
        nonfinite = torch.nan_to_num(grad_norm.float() * 0, nan=1.0)  # 1.0 iff inf/nan (inf * 0 = nan): 2 ops, not 5
        self.optimizer_step(nonfinite)
        self._unscaled = False
        return grad_norm.detach(), nonfinite

    def optimizer_step(self, skip: torch.Tensor) -> None:
        """Apply the accumulated gradients unless `skip` (a 0-d device tensor, 1.0 = non-finite
        step) is set, then zero them, without reading `skip` on the host where the optimizer allows.
        """
        if self.scaler:  # GradScaler finds and skips non-finite steps itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            step_unless(self.optimizer, skip)
        self.optimizer.zero_grad(set_to_none=True)

    # --- checkpoints and export -----------------------------------------------------------------
    def save(self, folder: Path) -> list[str]:
        """Write this rank's share of model/optimizer state into `folder`; return the file names written."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated fp32 weights with the bare model's key names, on rank 0 (None elsewhere). Collective."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Release strategy resources before the process group goes away."""
