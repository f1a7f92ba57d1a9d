"""Exact distributed evaluation: sums reduced across ranks, DistributedSampler padding not counted."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from .config.checks import eval_metrics
from .data import EvalData
from .distributed import DistContext, all_reduce_sum
from .losses import IGNORE_INDEX, Loss
from .strategies import Strategy


@contextlib.contextmanager
def observers_frozen(model: torch.nn.Module):
    """QAT's fake-quant observers (which run in eval mode too) see training batches only: an
    evaluation leaves their ranges, hence training and the int8 export, as they were."""
    flags = [
        m.observer_enabled for m in model.modules() if isinstance(getattr(m, "observer_enabled", None), torch.Tensor)
    ]
    saved = [flag.clone() for flag in flags]
    for flag in flags:
        flag.fill_(0)
    try:
        yield
    finally:
        for flag, value in zip(flags, saved):
            flag.copy_(value)


@torch.no_grad()
def evaluate(
    strategy: Strategy, loss_fn: Loss, eval_data: EvalData, ctx: DistContext, on_batch: Callable[[], None] | None = None
) -> dict[str, float]:
    """Sample-weighted mean loss (token-weighted for LMs), accuracy and perplexity over the whole split.

    `on_batch` is called before each batch (the trainer's hang watchdog: an evaluation longer than
    dist.timeout_s is progress, not a hang)."""
    model = strategy.model
    if isinstance(strategy, Strategy) and ctx.world_size > 1:
        # BatchNorm stats without sync last saw each rank's own batches (FSDP and ZeRO keep them per
        # rank): every rank evaluates rank 0's model, the one checkpoints and model.safetensors hold
        for buffer in strategy.module.buffers():
            dist.broadcast(buffer.data, src=0)
    with observers_frozen(model):
        return _evaluate(strategy, model, loss_fn, eval_data, ctx, on_batch or (lambda: None))


def _evaluate(strategy, model: torch.nn.Module, loss_fn: Loss, eval_data: EvalData, ctx: DistContext, on_batch):
    was_training = model.training
    model.eval()
    # loss sum, counted elements, correct, token NLL sum (LMs: perplexity)
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)
    position, is_lm = 0, False
    # class-id losses only: bce_with_logits takes (B, T, C) outputs too, as 0-1 targets of that shape
    perplexity = "eval_perplexity" in eval_metrics(loss_fn.name)
    for inputs, targets in eval_data.batches():
        on_batch()
        batch = targets.shape[0]
        valid = eval_data.valid[position : position + batch].to(ctx.device).view(batch, 1)
        position += batch
        inputs = inputs.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        with strategy.autocast():
            outputs = model(inputs)
        is_lm = is_lm or (perplexity and outputs.dim() == 3)
        losses = loss_fn.elementwise(outputs, targets).reshape(batch, -1).double()
        counted = valid if not loss_fn.ignores_targets else valid & (targets != IGNORE_INDEX).reshape(batch, -1)
        counted = counted.expand_as(losses).double()
        totals[0] += (losses * counted).sum()
        totals[1] += counted.sum()
        if loss_fn.classification:
            totals[2] += (loss_fn.correct(outputs, targets).reshape(batch, -1).double() * counted).sum()
        if is_lm:
            nll = losses if loss_fn.is_nll else loss_fn.nll(outputs, targets).reshape(batch, -1).double()
            totals[3] += (nll * counted).sum()
    all_reduce_sum(totals, ctx)
    if was_training:
        model.train()
    loss_sum, count, correct, nll_sum = totals.tolist()
    metrics = {"eval_loss": loss_sum / max(count, 1.0)}
    if loss_fn.classification:
        metrics["eval_accuracy"] = correct / max(count, 1.0)
    if is_lm:
        metrics["eval_perplexity"] = math.exp(min(nll_sum / max(count, 1.0), 80.0))
    return metrics
