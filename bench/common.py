"""The few pieces the hand-written loops share: their spec, factories, param groups, data, timestamps.

Kept apart from the loops so each loop file reads as the plain training loop a user would write.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler


def parse_spec() -> dict:
    parser = argparse.ArgumentParser(description="hand-written reference loop (launch with torchrun)")
    parser.add_argument("--spec", required=True, help="JSON workload spec (bench.workloads.Workload.spec)")
    parser.add_argument("--save", default=None, help="write the final weights here (torch.save), rank 0")
    args = parser.parse_args()
    spec = json.loads(args.spec)
    spec["save"] = args.save
    return spec


def factory(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def loss_function(spec: dict):
    """Mean cross-entropy over fp32 logits, through torch.compile when the model is compiled (as
    dist_train compiles its loss under train.compile), in the model's mode less its CUDA graphs
    (the loss of one micro-step must outlive the next)."""

    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())

    if not spec["compile"]:
        return cross_entropy
    mode = spec.get("compile_mode", "default")
    mode = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
    return torch.compile(cross_entropy, mode=mode)


def micro_loss(model: nn.Module, loss_fn, spec: dict, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A micro-batch's mean loss, the forward under bf16 autocast when the spec asks. With `fused_loss`
    the model returns the loss summed over the tokens itself (dist_train.fused_loss), as train.fused_loss."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16"):
        if spec.get("fused_loss"):  # the benchmarks' synthetic tokens have no ignored (-100) targets
            return model(inputs, targets=targets) / targets.numel()
        outputs = model(inputs)
    return loss_fn(outputs, targets)


def attention_preference(spec: dict) -> contextlib.AbstractContextManager:
    """The spec's attention kernel first in torch's priority order, every backend left enabled
    (train.sdpa_backend); "torch" keeps torch's order."""
    if spec.get("sdpa_backend", "torch") == "torch":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]
    first = {"flash": 0, "efficient": 1, "math": 2, "cudnn": 3}[spec["sdpa_backend"]]
    return sdpa_kernel([order[first], *order[:first], *order[first + 1 :]], set_priority=True)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as dist_train builds them: decay on >= 2-D parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def train_loader(spec: dict, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
    """torch's DistributedSampler (seeded shuffle, drop_last) over the same dataset factory."""
    dataset = factory(spec["data_factory"])("train", **spec["data_kwargs"])
    sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=spec["seed"], drop_last=True)
    # pinned batches on CUDA, as dist_train's loader.pin_memory default does
    pin = spec.get("device") != "cpu" and torch.cuda.is_available()
    loader = DataLoader(dataset, batch_size=spec["micro_batch_size"], sampler=sampler, drop_last=True, pin_memory=pin)
    return loader, sampler


def batches(loader: DataLoader, sampler: DistributedSampler):
    """Micro-batches forever, epoch after epoch (set_epoch reseeds the shuffle)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class StepTimes:
    """perf_counter at start, (perf_counter, process_time) after every optimizer step: dist_train's hook format."""

    def __init__(self) -> None:
        self.path = os.environ.get("DIST_TRAIN_STEP_TIMES")
        self.start = time.perf_counter()
        self.times: list[tuple[float, float]] = []

    def tick(self) -> None:
        self.times.append((time.perf_counter(), time.process_time()))

    @property
    def wall(self) -> list[float]:
        return [wall for wall, _ in self.times]

    def write(self, rank: int) -> None:
        if self.path:
            record = {
                "rank": rank,
                "train_start": self.start,
                "steps": self.wall,
                "cpu": [cpu for _, cpu in self.times],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            Path(f"{self.path}.rank{rank}").write_text(json.dumps(record))


def exit_now(code: int = 0) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def save_weights(model: nn.Module, path: str | None) -> None:
    if path:
        torch.save({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, path)
