"""`model.init`: re-initialise a freshly built model by scheme name.

The trainer calls `init_weights` right after the factory, under the run seed every rank shares and
before any transform or strategy wrapping, so every rank starts from the same weights.

Rule, for any model: every parameter with >= 2 dimensions (Linear/Conv/Embedding weights,
attention projections, RNN weight matrices, ...) is drawn from the scheme; every parameter whose
name ends in `bias` is set to 0; everything else (norm scales, 1-D parameters) keeps the factory's
value; an nn.Embedding's padding row stays 0. Tied weights are one parameter, drawn once.
"""

from __future__ import annotations

import torch
import torch.nn as nn

SCHEMES = ("default", "kaiming", "xavier", "normal")


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str, std: float = 0.02) -> int:
    """Apply `scheme` in place (`default`: leave the factory's init). Returns how many tensors it drew."""
    if scheme == "default":
        return 0
    drawn = 0
    # transformers' Conv1D (gpt2's attention and MLP) stores its weight as (in, out), transposed
    transposed = {id(m.weight) for m in model.modules() if type(m).__name__ == "Conv1D" and hasattr(m, "nf")}
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            if scheme == "kaiming":  # He et al. 2015, for ReLU networks: std sqrt(2 / fan_in)
                fan_in = "fan_out" if id(param) in transposed else "fan_in"  # torch reads fan_in from dim 1
                nn.init.kaiming_normal_(param, mode=fan_in, nonlinearity="relu")
            elif scheme == "xavier":  # Glorot & Bengio 2010: uniform, variance 2 / (fan_in + fan_out)
                nn.init.xavier_uniform_(param)
            else:
                nn.init.normal_(param, mean=0.0, std=std)
            drawn += 1
        elif name.endswith("bias"):
            param.zero_()
    for module in model.modules():  # keep nn.Embedding's padding row at zero, as its own init does
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    return drawn
