"""Minimal hand-written torchrun + DDP loop: the reference dist_train's DDP path is measured against.

    torchrun --nproc_per_node=2 -m bench.hand_ddp --spec '{...}'
    python -m bench.hand_ddp --spec '{...}'          # one process, no process group (bench.gpu)

Same model and dataset factories, seed, DistributedSampler order, fused AdamW (no decay on 1-D
parameters), accumulation with no_sync, clipping, bf16 autocast and torch.compile when the spec asks,
and the loss read on the host every `log_every` steps, as dist_train. `run()` is the loop itself
(callable in-process, with or without a process group).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from bench.common import (
    StepTimes,
    attention_preference,
    batches,
    exit_now,
    factory,
    loss_function,
    micro_loss,
    param_groups,
    parse_spec,
    save_weights,
    train_loader,
)
from bench.workloads import CUDA_GRAPH_MODES


def run(spec: dict, device: torch.device) -> tuple[StepTimes, torch.nn.Module]:
    clock = StepTimes()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(spec["seed"])
    module = factory(spec["model_factory"])(**spec["model_kwargs"]).to(device)
    if spec["compile"]:
        module.compile(mode=spec["compile_mode"])
    graphs = spec["compile"] and spec["compile_mode"] in CUDA_GRAPH_MODES and device.type == "cuda"
    model = DDP(module, gradient_as_bucket_view=True) if world_size > 1 else module
    optimizer = torch.optim.AdamW(
        param_groups(module, spec["weight_decay"]), lr=spec["lr"], betas=spec["betas"], eps=spec["eps"], fused=True
    )
    loader, sampler = train_loader(spec, rank, world_size)
    data = batches(loader, sampler)
    accum = spec["grad_accum_steps"]
    loss_fn = loss_function(spec)

    for step in range(1, spec["steps"] + 1):
        for micro in range(accum):
            inputs, targets = next(data)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if graphs:  # cudagraph trees: a new replay, the previous micro-step's outputs are spent
                torch.compiler.cudagraph_mark_step_begin()
            sync = micro == accum - 1 or world_size == 1
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = micro_loss(model, loss_fn, spec, inputs, targets) / accum
                loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), spec["grad_clip_norm"], foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % spec["log_every"] == 0 and rank == 0:
            print(f"step {step} loss {loss.item() * accum:.4f}", flush=True)
        clock.tick()
    return clock, module


def main() -> None:
    spec = parse_spec()
    cuda = torch.cuda.is_available() and spec.get("device", "auto") != "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("nccl" if cuda else "gloo")
    with attention_preference(spec):
        clock, module = run(spec, device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    clock.write(rank)
    if rank == 0:
        save_weights(module, spec["save"])
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now()  # skip interpreter teardown: c10d/gloo threads can abort it (see dist_train.cli.exit_with)
