"""Per-rank memory estimates: model states per strategy (ZeRO paper formulas) and activations.

Model states for Ψ trainable parameters on N ranks, after the ZeRO paper (Rajbhandari et al. 2020,
https://arxiv.org/abs/1910.02054, section 3.1 and Figure 1), with K bytes of optimizer state per
parameter, as the strategies here hold them (frozen parameters add their weights only):

    fp16 (DeepSpeed's own fp16: 2-byte weights and grads, fp32 master copy + Adam moments, K = 12):
        DDP 16Ψ   ZeRO-1 4Ψ + 12Ψ/N   ZeRO-2 2Ψ + 14Ψ/N   ZeRO-3 16Ψ/N
    fp32 and bf16 (fp32 weights and grads, fp32 master copy + Adam moments, K = 12):
        DDP 16Ψ   ZeRO-1 8Ψ + 12Ψ/N   ZeRO-2 4Ψ + 16Ψ/N   ZeRO-3 20Ψ/N

ZeRO-3 adds the parameters DeepSpeed keeps whole on every rank (those of at most 1e5 elements):
their weights' bytes once more (zero3_persistent_numel).

DeepSpeed's ZeRO optimizer keeps its fp32 master partition whatever the weights' dtype (a copy even
of fp32 weights), and `train.precision: bf16` runs it under `torch_autocast`: weights and gradients
stay fp32. DDP (and autocast in general) keeps fp32 weights and gradients and no master copy (16Ψ);
FSDP2 shards fp32 parameters, gradients and optimizer state (16Ψ/N) and only gathers low-precision
copies for compute. K follows `optim.name`: Adam/AdamW keep two fp32 moments (8 bytes), SGD with
momentum one (4), plain SGD none; ZeRO's master copy adds 4.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..config import Config
from ..models import build_model

STRATEGY_ROWS = ("ddp", "zero1", "zero2", "zero3", "fsdp")
ROW_LABELS = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP"}
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelStates:
    """Bytes per rank."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _per_rank(factor: float, numel: int) -> int:
    return math.ceil(factor * numel)  # a sharded tensor is padded to a multiple of the world size


def optimizer_states_per_param(cfg: Config) -> int:
    """fp32 optimizer tensors kept per parameter: Adam(W) 2 moments, SGD 1 momentum buffer or none."""
    if cfg.optim.name in ("adam", "adamw"):
        return 2
    return 1 if cfg.optim.momentum else 0


def configured_row(cfg: Config) -> str:
    """Which row of the memory table the config itself uses."""
    if cfg.strategy.name == "deepspeed":
        return f"zero{cfg.strategy.zero_stage}" if cfg.strategy.zero_stage else "ddp"
    return cfg.strategy.name


def model_state_bytes(
    numel: int, trainable: int, world_size: int, precision: str, states_per_param: int, persistent: int = 0
) -> dict[str, ModelStates]:
    """Per-rank bytes of parameters (all `numel`: frozen ones are held too), gradients and optimizer
    state (the `trainable` ones only) for every strategy row. ZeRO-3 holds the `persistent` elements
    (zero3_persistent_numel) whole on every rank besides their partitions."""
    n, fp32_optim = world_size, 4.0 * states_per_param
    fp32 = (4.0, 4.0, fp32_optim)
    # ZeRO keeps an fp32 master copy in the optimizer; only DeepSpeed's fp16 has 2-byte weights and
    # grads (bf16 is autocast over fp32 weights, see strategies/deepspeed.py)
    width = 2.0 if precision == "fp16" else 4.0
    p, g, o = width, width, fp32_optim + 4.0
    per_param = {
        "ddp": fp32,
        "zero1": (p, g, o / n),
        "zero2": (p, g / n, o / n),
        "zero3": (p / n, g / n, o / n),
        "fsdp": (fp32[0] / n, fp32[1] / n, fp32[2] / n),
    }
    states = {
        row: ModelStates(_per_rank(fp, numel), _per_rank(fg, trainable), _per_rank(fo, trainable))
        for row, (fp, fg, fo) in per_param.items()
    }
    states["zero3"].params += _per_rank(p, persistent)
    return states


ZERO3_PERSISTENCE = {"param": 100_000, "model": sys.maxsize}  # DeepSpeed's defaults


def _zero_option(zero: dict, name: str) -> int:
    """`zero_optimization.stage3_<name>_persistence_threshold` (or its field name without `stage3_`)."""
    value = zero.get(f"stage3_{name}_persistence_threshold", zero.get(f"{name}_persistence_threshold"))
    return ZERO3_PERSISTENCE[name] if value is None else int(value)


def zero3_persistent_numel(model: nn.Module, zero: dict) -> int:
    """Elements of the parameters ZeRO-3 keeps whole on every rank: DeepSpeed gathers each parameter
    of at most `stage3_param_persistence_threshold` elements (1e5: biases, norms, small layers) once
    and never releases it, while the total stays within `stage3_model_persistence_threshold`.
    `zero`: the run's `zero_optimization` section (DeepSpeed's defaults where it says nothing)."""
    param_limit, model_limit = _zero_option(zero, "param"), _zero_option(zero, "model")
    total = 0
    for p in model.parameters():  # in DeepSpeed's order (named_parameters, tied weights once)
        if p.numel() <= param_limit and total + p.numel() <= model_limit:
            total += p.numel()
    return total


def precision_note(precision: str) -> str:
    if precision == "fp16":
        return (
            "fp16: ZeRO rows use the mixed-precision split (2-byte params and grads, fp32 master copy + "
            "optimizer state); DDP and FSDP keep fp32 params/grads/state (autocast)"
        )
    return (
        f"{precision}: params 4 B, grads 4 B, optimizer state 4 B per fp32 tensor per parameter (Adam: 8 B); "
        "ZeRO adds its fp32 master copy (4 B)"
        + (", bf16 autocast keeps fp32 params/grads" if precision == "bf16" else "")
    )


def build_for_inspection(cfg: Config) -> tuple[nn.Module, str]:
    """The model on the meta device (shapes only, no memory) when its factory allows, else on the CPU."""
    try:
        with torch.device("meta"):
            return build_model(cfg.model.name, cfg.model.kwargs), "meta"
    except Exception:  # noqa: BLE001 - a factory that needs real tensors (e.g. loads weights): build it for real
        # what the factory raises comes as a UserError (call_factory): from_pretrained refuses the meta
        # device; a config the run refuses too fails again here, with the run's own message
        from ..build import initial_model

        return initial_model(cfg), "cpu"  # the run's first weights: check's first-batch probe runs this model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter elements; shared (tied) parameters counted once."""
    params = list(model.parameters())  # parameters() de-duplicates tied weights
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # one id per storage, views included (works on meta tensors too)


def _saved_bytes(
    model: nn.Module, batch: torch.Tensor, autocast, checkpointed: list[nn.Module], model_kwargs: dict
) -> int:
    """Storage bytes saved for backward by one forward (parameters and buffers excluded)."""
    skip = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key not in skip:
            saved[key] = t.untyped_storage().nbytes()

    def keep_inputs(_module: nn.Module, args: tuple) -> None:
        # a checkpointed block keeps its inputs itself, outside the saved-tensor hooks
        for arg in args:
            if torch.is_tensor(arg):
                keep(arg)

    hooks = [block.register_forward_pre_hook(keep_inputs) for block in checkpointed]
    try:
        with (
            torch.enable_grad(),
            autocast,
            torch.autograd.graph.saved_tensors_hooks(lambda t: keep(t) or t, lambda t: t),
        ):
            outputs = model(batch, **model_kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    for out in outputs if isinstance(outputs, (tuple, list)) else [outputs]:
        if torch.is_tensor(out):
            keep(out)  # the loss saves (a copy of) the outputs: log-softmax of the logits, say
    return sum(saved.values())


def activation_bytes(model: nn.Module, sample: torch.Tensor, cfg: Config, device: str) -> int:
    """Bytes autograd keeps for backward after one micro-batch's forward (plus the outputs).

    Measured by recording every tensor saved for backward (`saved_tensors_hooks`), counting each
    storage once and skipping parameters and buffers. On the meta device nothing is allocated;
    bf16/fp16 run the model in that dtype there (autocast does not apply to meta tensors), so the
    figure is an estimate. With activation checkpointing, what stays saved is the blocks' inputs
    plus, during backward, one block's recomputed activations.
    """
    from ..transforms import enable_grad_checkpointing, find_blocks

    batch = sample.unsqueeze(0).expand(cfg.train.micro_batch_size, *sample.shape).contiguous().to(device)
    dtype = LOW_PRECISION.get(cfg.train.precision)
    if device == "meta" and dtype is not None:
        model = model.to(dtype)
        if batch.is_floating_point():
            batch = batch.to(dtype)
    autocast = torch.autocast("cpu", dtype=dtype) if device == "cpu" and dtype is not None else nullcontext()
    model.train()
    # train.fused_loss: the model computes the loss from targets (any ids) and keeps no logits
    kwargs = {"targets": torch.zeros(batch.shape, dtype=torch.long, device=device)} if cfg.train.fused_loss else {}
    full = _saved_bytes(model, batch, autocast, [], kwargs)
    if not cfg.train.grad_checkpointing:
        return full
    enable_grad_checkpointing(model, cfg.train.grad_checkpointing_every)
    checkpointed = find_blocks(model)[:: cfg.train.grad_checkpointing_every]
    kept = _saved_bytes(model, batch, autocast, checkpointed, kwargs)
    return kept + (full - kept) // max(1, len(checkpointed))  # + one block recomputed at a time
