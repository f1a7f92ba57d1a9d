"""Model FLOPs per token and GPU peak throughput, for model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s, where the model FLOPs of a training step are those of
forward + backward without recomputation (activation checkpointing does not raise MFU) and the
peak is the GPU's bf16 dense tensor-core rate (the usual reference, as in PaLM and nanoGPT, also
for fp32 runs: it says how far the run is from what the chip can do).

Per token, a decoder-only transformer costs 6·N (2 FLOPs per parameter per token forward, 4
backward) plus attention's score and value matmuls, 12·L·T·d (L layers, sequence length T, width
d; PaLM appendix B, https://arxiv.org/abs/2204.02311). N leaves out the position embedding, a
lookup rather than a matmul; the token embedding counts once through the tied output projection.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

# Dense (no 2:4 sparsity) bf16 tensor-core peak per GPU in TFLOP/s, from NVIDIA's datasheets.
# First match wins against torch.cuda.get_device_name() (lower case), so specific names go first.
GPU_PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"h100.*(nvl)", 835.0),  # H100 NVL: 1,671 sparse
    (r"h100.*(pcie)", 756.0),  # H100 PCIe: 1,513 sparse
    (r"h100", 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 sparse
    (r"h200.*(nvl)", 835.0),  # H200 NVL: 1,671 sparse
    (r"h200", 989.0),  # H200 SXM: same compute as H100 SXM, more and faster memory
    (r"a100", 312.0),  # A100 SXM and PCIe, 40 and 80 GB: 624 sparse
    (r"a10g", 125.0),  # AWS A10G: no public datasheet; the A10's 125 (250 sparse) is the usual reference
    (r"\ba10\b", 125.0),  # A10
    (r"\bl4\b", 121.0),  # L4: 242 sparse
    (r"rtx 4090", 165.2),  # GeForce: bf16 with fp32 accumulate, Ada whitepaper (330.4 sparse)
    (r"v100.*pcie", 112.0),  # V100 has no bf16: fp16 tensor-core peak
    (r"v100", 125.0),  # V100 SXM2: fp16 tensor-core peak
]


def peak_tflops(device_name: str) -> float | None:
    """bf16 dense peak TFLOP/s of the GPU called `device_name` (torch.cuda.get_device_name), or None."""
    name = device_name.lower()
    for pattern, tflops in GPU_PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None


def transformer_flops_per_token(n_params: int, n_layers: int, seq_len: int, d_model: int) -> float:
    """Training FLOPs per token of a decoder-only transformer: 6·N + 12·L·T·d."""
    return 6.0 * n_params + 12.0 * n_layers * seq_len * d_model


def _numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", param.numel())  # DeepSpeed ZeRO-3 keeps the full size in ds_numel


def model_flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """Training FLOPs per token, when the model says how; None otherwise.

    A model may define `flops_per_token(seq_len)`; the zoo's `transformer_lm` is recognised by its
    class (`TransformerLM`). Other models report no MFU.
    """
    own = getattr(model, "flops_per_token", None)
    if callable(own):
        return float(own(seq_len))
    from .models.transformer_lm import TransformerLM

    if isinstance(model, TransformerLM):
        n_params = sum(_numel(p) for p in model.parameters()) - _numel(model.pos_emb.weight)
        d_model = model.tok_emb.embedding_dim
        return transformer_flops_per_token(n_params, len(model.blocks), seq_len, d_model)
    return None


def mfu_per_token(model: nn.Module, tokens_per_sample: int, ctx) -> float | None:
    """MFU contributed by one token per second: flops_per_token / (peak FLOP/s x world size).

    None (no `mfu` in the metrics) off CUDA, for inputs that are not tokens, for models whose FLOPs
    are unknown and for GPUs missing from GPU_PEAK_BF16_TFLOPS.
    """
    if ctx.device.type != "cuda" or tokens_per_sample <= 1:
        return None
    flops = model_flops_per_token(model, tokens_per_sample)
    peak = peak_tflops(torch.cuda.get_device_name(ctx.device))
    if flops is None or peak is None:
        return None
    return flops / (peak * 1e12 * ctx.world_size)
