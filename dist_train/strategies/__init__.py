"""Strategy registry: `strategy.name` -> the class that implements it (imported on use)."""

from __future__ import annotations

from ..config import Config
from ..distributed import DistContext
from ..errors import UserError
from ..imports import import_object
from .base import Strategy

REGISTRY: dict[str, str] = {
    "ddp": "dist_train.strategies.ddp:DDPStrategy",
    "deepspeed": "dist_train.strategies.deepspeed:DeepSpeedStrategy",
    "fsdp": "dist_train.strategies.fsdp:FSDPStrategy",
}


def build_strategy(cfg: Config, ctx: DistContext) -> Strategy:
    name = cfg.strategy.name
    if name not in REGISTRY:
        raise UserError(f"strategy.name={name!r} is not available in this version (available: {', '.join(REGISTRY)})")
    return import_object(REGISTRY[name], "strategy")(cfg, ctx)
