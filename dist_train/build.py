"""What a run builds before its first step: model, transforms, strategy, data and loss, in an order
whose seeds make every rank alike."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch.nn as nn

from .compress import Compression
from .config import Config
from .data import EvalData, TrainData, build_eval_data, build_train_data, same_counts
from .distributed import DistContext
from .errors import UserError
from .losses import Loss, build_loss
from .models import build_model
from .models.weight_init import init_weights
from .rng import seed_everything
from .strategies import Strategy, build_strategy
from .transforms import apply_transforms


class Built(NamedTuple):
    """What a run builds before its first step, alike on every rank."""

    strategy: Strategy
    compression: Compression
    data: TrainData
    eval_data: EvalData | None
    loss_fn: Loss  # evaluation's
    train_loss: Loss  # the same loss, its normaliser static when no target is ignored


DATA_SEED_OFFSET = 104_729  # dataset factories run under run.seed + this (the run and dist-train check)


def initial_model(cfg: Config) -> nn.Module:
    """The model every rank starts from: the factory, then model.init, under the run seed."""
    seed_everything(cfg.run.seed)  # same seed on every rank: identical initial weights
    model = build_model(cfg.model.name, cfg.model.kwargs)
    # train mode throughout, as after an evaluation: transformers' from_pretrained returns eval mode (no dropout)
    model.train()
    init_weights(model, cfg.model.init, cfg.model.init_std)  # model.init, under the same seed
    require_fused_loss_support(cfg, model)
    return model


def build_run(cfg: Config, ctx: DistContext) -> Built:
    """Model, transforms, strategy, data and loss, in an order whose seeds make every rank alike."""
    model = initial_model(cfg)
    compression = Compression(cfg, model)  # QAT observers, pruning masks: state_dict keys stable from step 0
    model = apply_transforms(model, cfg, ctx)
    strategy = build_strategy(cfg, ctx)
    strategy.setup(model)
    seed_everything(cfg.run.seed + DATA_SEED_OFFSET)  # factories: the same draws on every rank, at any world size
    data = build_train_data(cfg, ctx)
    eval_data = build_eval_data(cfg, ctx)
    compression.probe(data.dataset[0][0])  # QAT: an op without an int8 kernel is refused now, not after training
    seed_everything(cfg.run.seed + 7919 * (ctx.rank + 1))  # per-rank stream for dropout and friends
    loss_fn = build_loss(cfg.train.loss, **cfg.train.loss_kwargs)
    if cfg.train.compile:
        loss_fn = loss_fn.compiled(cfg.train.compile_mode)
    train_loss = loss_fn  # a TensorDataset with no IGNORE_INDEX: static normaliser, no all-reduce per step
    if same_counts(data.dataset, loss_fn.ignores_targets):
        train_loss = replace(loss_fn, ignores_targets=False, same_count=True)
    if cfg.train.fused_loss:
        train_loss = replace(train_loss, in_model=True)
    require_eval_split(cfg, eval_data is not None)
    return Built(strategy, compression, data, eval_data, loss_fn, train_loss)


def require_fused_loss_support(cfg: Config, model: nn.Module) -> None:
    """train.fused_loss needs a model whose forward takes the targets and returns the loss sum; one
    that switches to it (`enable_fused_loss()`: hf_causal_lm) does so here, or says why it cannot."""
    if not cfg.train.fused_loss:
        return
    enable = getattr(model, "enable_fused_loss", None)
    if callable(enable) and (refusal := enable()):
        raise UserError(
            f"train.fused_loss: model {cfg.model.name!r} cannot compute its own loss: {refusal}; "
            "set train.fused_loss=false"
        )
    if not getattr(model, "supports_fused_loss", False):
        raise UserError(
            f"train.fused_loss: model {cfg.model.name!r} ({type(model).__name__}) does not compute its own loss; "
            "use transformer_lm or hf_causal_lm, give the model `supports_fused_loss = True` and a forward(inputs, "
            "targets=None, label_smoothing=0.0) that returns the summed loss given targets "
            "(dist_train.fused_loss.LMHead), or set train.fused_loss=false"
        )


def require_eval_split(cfg: Config, has_eval_split: bool) -> None:
    """Evaluations during training (and early stopping, which counts them) need an eval split (the run
    and `dist-train check`)."""
    wanted = [key for key in ("every_steps", "early_stopping_patience") if getattr(cfg.eval, key)]
    if wanted and not has_eval_split:
        raise UserError(
            f"{' and '.join('eval.' + key for key in wanted)} set, but dataset {cfg.data.name!r} has no `eval` split "
            "(none, or an empty one): give it eval samples (data.eval_samples for the synthetic datasets), or set "
            f"{' and '.join('eval.' + key + '=null' for key in wanted)}"
        )
