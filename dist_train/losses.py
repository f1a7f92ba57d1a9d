"""Losses by name, computed as (sum over counted elements) so the trainer can normalise by the
global count: the update then equals one big batch whatever the micro-batching and world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

from .errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Loss:
    name: str
    elementwise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # -> per counted element, ignored ones 0
    classification: bool  # report accuracy in eval
    ignores_targets: bool  # targets may hold IGNORE_INDEX: count them per batch
    summed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # reduction="sum" in one op
    is_nll: bool = False  # elementwise is the plain negative log-likelihood (perplexity = exp of its mean)
    same_count: bool = False  # every rank counts as many elements in every step: no all-reduce of the count
    smoothing: float = 0.0  # cross_entropy's label smoothing
    in_model: bool = False  # train.fused_loss: the model's forward computes the sum itself (fused_loss.py)

    def count(self, targets: torch.Tensor) -> int:
        """Counted elements of a (host) target batch; the normaliser's share of this micro-batch."""
        if self.ignores_targets:
            return int((targets != IGNORE_INDEX).sum())
        return targets.numel()

    def model_kwargs(self, targets: torch.Tensor) -> dict:
        """Keyword arguments of the model's training forward: the targets when the model computes the loss."""
        return {"targets": targets, "label_smoothing": self.smoothing} if self.in_model else {}

    def sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss: the sum over counted elements (torch's fused sum reduction where it has one)."""
        if self.summed is not None:
            return self.summed(outputs, targets)
        return self.elementwise(outputs, targets).sum()

    def compiled(self, mode: str = "default") -> Loss:
        """This loss with its training sum through torch.compile (`train.compile`): an LM's fp32
        upcast, log-softmax and reduction over (tokens, vocab) logits fuse into a few passes over
        the logits instead of several full-size fp32 tensors (about a fifth of a GPT-2-small step).

        `mode` is `train.compile_mode` less its CUDA graphs: the loop keeps each micro-step's loss
        until the optimizer step, and a replayed graph would overwrite it with the next one's."""
        mode = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
        return replace(self, summed=torch.compile(self.sum, mode=mode))

    def nll(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood of class outputs (ignored targets 0), for perplexity:
        the loss itself unless it is smoothed or reweighted (label smoothing, focal)."""
        if self.is_nll:
            return self.elementwise(outputs, targets)
        logits, flat = _class_logits(outputs, targets, self.name)
        return F.cross_entropy(logits, flat, ignore_index=IGNORE_INDEX, reduction="none")

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-element 0/1 correctness, same shape as the elementwise loss (classification only)."""
        if self.name == "bce_with_logits":
            outputs, targets = _same_shape(outputs, targets, self.name)  # (B, 1) vs (B,) must not broadcast
            return ((outputs > 0).float() == targets).float()
        predicted = outputs.argmax(dim=-1)
        return ((predicted == targets) & (targets != IGNORE_INDEX)).float()


def check_class_targets(outputs: torch.Tensor, targets: torch.Tensor, name: str) -> None:
    """Class outputs (B, C) with targets (B,), or (B, T, C) with (B, T), the targets class ids."""
    if outputs.dim() != targets.dim() + 1 or outputs.shape[:-1] != targets.shape:
        raise UserError(
            f"loss {name}: outputs {tuple(outputs.shape)} do not fit targets {tuple(targets.shape)}; "
            "expected outputs (B, C) with targets (B,), or (B, T, C) with (B, T)"
        )
    if targets.is_floating_point():  # focal's gather would fail at the first step with a traceback
        raise UserError(
            f"loss {name}: targets are class ids, got {str(targets.dtype).removeprefix('torch.')} targets; "
            "make the dataset's targets integer (torch.long), or use a loss for float targets (mse, bce_with_logits)"
        )


def _class_logits(outputs: torch.Tensor, targets: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) with (B,), or (B, T, C) with (B, T) -> flat (N, C) logits and (N,) targets, in fp32."""
    check_class_targets(outputs, targets, name)
    return outputs.reshape(-1, outputs.shape[-1]).float(), targets.reshape(-1).long()  # int32, uint8: torch wants int64


def _same_shape(outputs: torch.Tensor, targets: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if outputs.shape != targets.shape:
        squeezed = outputs.squeeze(-1) if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1 else None
        if squeezed is None or squeezed.shape != targets.shape:  # (B, 1) predictions for (B,) targets only
            raise UserError(
                f"loss {name}: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ in shape"
            )
        outputs = squeezed
    return outputs.float(), targets.float()


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past the largest float: float() of it fails too
        return False


def _check_ranges(name: str, kwargs: dict) -> None:
    """Loss arguments torch would refuse at the first batch (or take and train nonsense with)."""

    def numbers(key: str, lists: bool) -> list:
        value = kwargs[key]
        values = value if lists and isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            kind = "a number or a list of numbers" if lists else "a number"
            raise UserError(f"train.loss_kwargs.{key} must be {kind}, got {value!r}")
        return values

    bounds = {  # key: (lowest, highest, lowest allowed itself, a list of per-class/column values allowed)
        "label_smoothing": (0.0, 1.0, True, False),
        "beta": (0.0, float("inf"), True, False),
        "gamma": (0.0, float("inf"), True, False),
        "alpha": (0.0, float("inf"), True, True),
        "pos_weight": (0.0, float("inf"), False, True),
    }
    for key, (low, high, closed, lists) in bounds.items():  # NaN fails every comparison: refused too
        if lists and kwargs.get(key) is None:  # alpha, pos_weight: null is their documented default (none)
            continue
        # finite: gamma=.inf zeroed every loss (nothing trained, status 0), pos_weight=.inf made them NaN
        if key in kwargs and not all(
            (v >= low if closed else v > low) and v <= high and _finite(v) for v in numbers(key, lists)
        ):
            span = (
                f"[{low:g}, {high:g}]" if high < float("inf") else (">= 0 and finite" if closed else "> 0 and finite")
            )
            raise UserError(f"train.loss_kwargs.{key} for {name} must be {span}, got {kwargs[key]!r}")


def build_loss(name: str, **kwargs: float) -> Loss:
    """`train.loss` + `train.loss_kwargs` -> Loss."""
    allowed = {
        "cross_entropy": {"label_smoothing"},
        "focal": {"gamma", "alpha"},
        "smooth_l1": {"beta"},
        "mse": set(),
        "l1": set(),
        "bce_with_logits": {"pos_weight"},
    }
    if name not in allowed:
        raise UserError(f"unknown train.loss {name!r} (known: {', '.join(allowed)})")
    unknown = set(kwargs) - allowed[name]
    if unknown:
        raise UserError(
            f"train.loss_kwargs {sorted(unknown)} do not apply to {name} (it takes: {sorted(allowed[name]) or 'none'})"
        )

    _check_ranges(name, kwargs)
    if name == "cross_entropy":
        smoothing = float(kwargs.get("label_smoothing", 0.0))

        def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
            logits, flat = _class_logits(outputs, targets, name)
            return F.cross_entropy(
                logits, flat, ignore_index=IGNORE_INDEX, reduction=reduction, label_smoothing=smoothing
            )

        return Loss(
            name,
            cross_entropy,
            classification=True,
            ignores_targets=True,
            summed=partial(cross_entropy, reduction="sum"),
            is_nll=smoothing == 0,
            smoothing=smoothing,
        )
    if name == "focal":
        gamma, alpha = float(kwargs.get("gamma", 2.0)), kwargs.get("alpha")

        def focal(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # Lin et al. 2017: -alpha_t (1 - p_t)^gamma log p_t, on softmax probabilities
            logits, flat = _class_logits(outputs, targets, name)
            keep = flat != IGNORE_INDEX
            index = flat.clamp(min=0)  # ignored targets: any valid class, zeroed below
            log_p = F.log_softmax(logits, dim=-1).gather(1, index.unsqueeze(1)).squeeze(1)
            # 1 - p_t as -expm1(log p_t): exact near p_t = 1. The clamp keeps the gradient of
            # x^gamma (gamma < 1) finite when p_t rounds to 1; it was NaN there before.
            loss = -((-torch.expm1(log_p)).clamp(min=1e-12) ** gamma) * log_p
            if alpha is not None:  # a scalar, or a list of one weight per class
                alpha_t = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
                if alpha_t.dim() and alpha_t.numel() != logits.shape[-1]:  # not an IndexError mid-step
                    raise UserError(
                        f"train.loss_kwargs.alpha for focal has {alpha_t.numel()} weights, but the model outputs "
                        f"{logits.shape[-1]} classes: give one weight per class, or a scalar"
                    )
                loss = loss * (alpha_t[index] if alpha_t.dim() else alpha_t)
            return loss * keep

        return Loss(name, focal, classification=True, ignores_targets=True)
    if name == "bce_with_logits":
        pos_weight = kwargs.get("pos_weight")

        def bce(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
            out, tgt = _same_shape(outputs, targets, name)
            # a scalar, or one weight per output column
            weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=out.dtype, device=out.device)
            return F.binary_cross_entropy_with_logits(out, tgt, reduction=reduction, pos_weight=weight)

        return Loss(name, bce, classification=True, ignores_targets=False, summed=partial(bce, reduction="sum"))
    beta = float(kwargs.get("beta", 1.0))
    functions = {
        "mse": F.mse_loss,
        "l1": F.l1_loss,
        "smooth_l1": partial(F.smooth_l1_loss, beta=beta),
    }

    def regression(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
        return functions[name](*_same_shape(outputs, targets, name), reduction=reduction)

    return Loss(
        name, regression, classification=False, ignores_targets=False, summed=partial(regression, reduction="sum")
    )
