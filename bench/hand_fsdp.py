"""Minimal hand-written torchrun + FSDP2 loop: the reference for strategy.name=fsdp.

    torchrun --nproc_per_node=2 -m bench.hand_fsdp --spec '{...}'

`fully_shard` on every repeated block, then the root (as dist_train does), with bf16 parameters
for compute, fp32 gradient reduction and the forward under bf16 autocast (as dist_train) when the
spec asks for bf16, after `model.compile()` when it
asks for compile; fused AdamW on the sharded parameters with the same groups; no gradient
reduce-scatter on accumulation micro-steps (`set_requires_gradient_sync(False)`); clipping of the
global norm.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
    train_loader,
)


def run(spec: dict, device: torch.device) -> tuple[StepTimes, torch.nn.Module]:
    """The loop (the process group exists)."""
    clock = StepTimes()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(spec["seed"])
    model = factory(spec["model_factory"])(**spec["model_kwargs"]).to(device)
    if spec["compile"]:
        model.compile(mode=spec["compile_mode"])
    mesh = init_device_mesh(device.type, (world_size,))
    bf16 = spec["precision"] == "bf16"
    fp32 = MixedPrecisionPolicy()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else fp32
    reshard = spec["strategy_options"].get("reshard_after_forward", True)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    optimizer = torch.optim.AdamW(
        param_groups(model, spec["weight_decay"]), lr=spec["lr"], betas=spec["betas"], eps=spec["eps"], fused=True
    )
    loader, sampler = train_loader(spec, rank, world_size)
    data = batches(loader, sampler)
    accum = spec["grad_accum_steps"]
    loss_fn = loss_function(spec)

    for step in range(1, spec["steps"] + 1):
        for micro in range(accum):
            inputs, targets = next(data)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            model.set_requires_gradient_sync(micro == accum - 1)
            loss = micro_loss(model, loss_fn, spec, inputs, targets) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip_norm"], foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % spec["log_every"] == 0 and rank == 0:
            print(f"step {step} loss {loss.item() * accum:.4f}", flush=True)
        clock.tick()
    return clock, model


def main() -> None:
    spec = parse_spec()
    cuda = torch.cuda.is_available() and spec.get("device", "auto") != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    with attention_preference(spec):
        clock, model = run(spec, device)
    rank = dist.get_rank()
    clock.write(rank)
    if spec["save"]:  # gathering the full state dict is collective
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({k: v.float() for k, v in state.items()}, spec["save"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now()  # skip interpreter teardown: c10d/gloo threads can abort it (see dist_train.cli.exit_with)
