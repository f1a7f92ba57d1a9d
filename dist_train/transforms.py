"""Model transforms applied before the strategy wraps the model, in one fixed order:

1. SyncBatchNorm conversion: must see the original BatchNorm modules, before anything wraps them.
2. Activation checkpointing per block: patches block forwards in place, so parameter names and
   `state_dict` keys stay those of the bare model (checkpoints and export see no wrapper names).
3. torch.compile last: it must trace the model as it will run, checkpointing included.

`preferred_attention()` is not a transform but a kernel choice for the whole run
(`train.sdpa_backend`): it must be in force when torch.compile traces the model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import Config
from .distributed import DistContext

log = logging.getLogger("dist_train")


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: its `blocks` (zoo) or `layers` ModuleList, else none.

    Each block once: a block the list holds twice (weights shared across depth) is wrapped once.
    """
    for name in ("blocks", "layers"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return list(dict.fromkeys(blocks))
    return []


def _checkpointed_forward(original, *args, **kwargs):
    # Non-reentrant checkpointing: works with kwargs, DDP/FSDP hooks and inputs that need no grad.
    if not torch.is_grad_enabled():
        return original(*args, **kwargs)
    # The recompute in backward runs the block in train mode again: keep BatchNorm's running
    # statistics (and num_batches_tracked) as the forward left them, or they move twice a step.
    module = original.__self__
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers()]
    if not buffers:  # nothing to keep: no bookkeeping, whose side effect torch.compile could not trace
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    calls = []

    def run(*a, **k):
        if not calls:  # the forward pass
            calls.append(1)
            return original(*a, **k)
        saved = [b.clone() for b in buffers]
        try:
            return original(*a, **k)
        finally:  # also when checkpoint's early stop ends the recompute with an exception
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def enable_grad_checkpointing(model: nn.Module, every: int = 1) -> int:
    """Recompute every `every`-th block's activations in backward. Returns how many blocks it covers."""
    from .errors import UserError, on_every_rank

    if hasattr(model, "gradient_checkpointing_enable") and hasattr(model, "config"):  # Hugging Face
        if every != 1:
            raise on_every_rank(
                UserError(
                    "train.grad_checkpointing_every applies to the zoo's blocks; a Hugging Face model "
                    "checkpoints every layer its own way: set it to 1"
                )
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return -1
    blocks = find_blocks(model)
    if not blocks:
        raise UserError(
            "train.grad_checkpointing needs a model whose repeated blocks are an nn.ModuleList attribute "
            "`blocks` or `layers`, or a Hugging Face model"
        )
    chosen = blocks[::every]
    for block in chosen:
        block.forward = functools.partial(_checkpointed_forward, block.forward)
    return len(chosen)


def apply_transforms(model: nn.Module, cfg: Config, ctx: DistContext) -> nn.Module:
    """Apply the configured transforms in the order documented above."""
    if cfg.train.sync_batchnorm:
        from .sync_batchnorm import convert_sync_batchnorm

        model = convert_sync_batchnorm(model, ctx.device.type)
    if cfg.train.grad_checkpointing:
        count = enable_grad_checkpointing(model, cfg.train.grad_checkpointing_every)
        log.info("activation checkpointing on %s", "the Hugging Face model" if count < 0 else f"{count} blocks")
    if cfg.train.compile:
        # in place: no OptimizedModule wrapper, so state_dict keys carry no `_orig_mod.`. Static
        # shapes: training shapes are fixed, and FSDP2's per-block graphs meet one forward at several
        # shapes, where automatic dynamic shapes broke Inductor (tests/test_strategies.py)
        model.compile(mode=cfg.train.compile_mode, dynamic=False)
    return model


# train.sdpa_backend -> torch.nn.attention.SDPBackend (the order after a preferred one)
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
    "cudnn": "CUDNN_ATTENTION",
}


@contextlib.contextmanager
def preferred_attention(name: str):
    """`F.scaled_dot_product_attention` tries `name`'s kernel first while the context lasts, then
    torch's order: every backend stays enabled, so a shape, dtype or device the preferred kernel
    cannot serve falls back as before (on a CPU nothing changes). `torch` leaves torch's own order,
    which depends on the release and the GPU: torch 2.11 on an H100 runs cuDNN's kernel for causal
    bf16 attention (measured, 2026-11-27), older releases put flash first and cuDNN last."""
    if name == "torch":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .errors import UserError, on_every_rank

    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        raise on_every_rank(
            UserError(
                f"train.sdpa_backend={name} needs torch >= 2.6 (an attention priority order); this is torch "
                f"{torch.__version__}: upgrade torch or set train.sdpa_backend=torch"
            )
        )
    order = [getattr(SDPBackend, SDPA_BACKENDS[name])]
    order += [getattr(SDPBackend, member) for key, member in SDPA_BACKENDS.items() if key != name]
    if hasattr(SDPBackend, "OVERRIDEABLE"):  # out-of-tree devices' own kernels stay enabled too
        order.append(SDPBackend.OVERRIDEABLE)
    with sdpa_kernel(order, set_priority=True):
        yield
