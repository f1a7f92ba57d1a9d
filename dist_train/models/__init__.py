"""Model registry: a name maps to `module:factory`, imported only when the config names it."""

from __future__ import annotations

import torch.nn as nn

from ..imports import call_factory, resolve

REGISTRY: dict[str, str] = {
    "mlp": "dist_train.models.mlp:mlp",
    "resnet": "dist_train.models.resnet:resnet",
    "transformer_lm": "dist_train.models.transformer_lm:transformer_lm",
    "cnn": "dist_train.models.cnn:cnn",
    "rnn_classifier": "dist_train.models.rnn:rnn_classifier",
    "tcn": "dist_train.models.tcn:tcn",
    "transformer_classifier": "dist_train.models.transformer_classifier:transformer_classifier",
    "hf_causal_lm": "dist_train.models.hf:hf_causal_lm",
    "hf_seq_cls": "dist_train.models.hf:hf_seq_cls",
}


def build_model(name: str, kwargs: dict) -> nn.Module:
    """`model.name` + the other `model.*` keys -> an nn.Module (same init on every rank: seed first)."""
    from ..errors import UserError, on_every_rank

    try:
        model = call_factory(resolve(name, REGISTRY, "model"), kwargs, f"model {name!r}")
    except UserError as err:
        raise on_every_rank(err) from None  # every rank builds the same model
    if not isinstance(model, nn.Module):
        raise on_every_rank(UserError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module"))
    if not any(p.requires_grad for p in model.parameters()):  # the optimizer would refuse: empty parameter list
        raise on_every_rank(
            UserError(
                f"model factory {name!r} returned a {type(model).__name__} with no trainable parameters "
                "(none, or all with requires_grad=False): nothing to train"
            )
        )
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:  # DDP, FSDP2, ZeRO and the optimizer all need the shapes before the first batch
        raise on_every_rank(
            UserError(
                f"model factory {name!r} returned lazy modules whose parameters are not initialized yet "
                f"({', '.join(lazy[:3])}{', ...' if len(lazy) > 3 else ''}): give them their sizes (nn.Linear, "
                "nn.BatchNorm2d) or run one forward pass on an example input in the factory before returning"
            )
        )
    return model
