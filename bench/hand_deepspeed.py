"""Minimal hand-written torchrun + DeepSpeed-engine loop: the reference for strategy.name=deepspeed.

    torchrun --nproc_per_node=2 -m bench.hand_deepspeed --spec '{...}'

The canonical engine loop (forward, `engine.backward`, `engine.step` every micro-step; the engine
scales by 1/accumulation and steps at the boundary) with the DeepSpeed config dist_train derives
(micro-batch, accumulation, clipping, ZeRO stage, bf16 as the engine's autocast), torch.compile when
the spec asks, and the same torch AdamW param groups (unfused: ZeRO steps it on flat partitions),
model, data order, seed, and the model's own loss when the spec fuses it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from bench.common import (
    StepTimes,
    batches,
    exit_now,
    factory,
    loss_function,
    param_groups,
    parse_spec,
    save_weights,
    train_loader,
)


def main() -> None:
    spec = parse_spec()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    clock = StepTimes()
    import deepspeed

    if not torch.cuda.is_available():  # its shared-memory all-reduce serves inference only: not compiled (g++)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(spec["seed"])
    model = factory(spec["model_factory"])(**spec["model_kwargs"])
    if spec["compile"]:  # in place, before the engine wraps it (as dist_train's transforms)
        model.compile(mode=spec["compile_mode"])
    optimizer = torch.optim.AdamW(
        param_groups(model, spec["weight_decay"]), lr=spec["lr"], betas=spec["betas"], eps=spec["eps"]
    )
    accum = spec["grad_accum_steps"]
    loss_fn = loss_function(spec)
    config = {
        "train_micro_batch_size_per_gpu": spec["micro_batch_size"],
        "gradient_accumulation_steps": accum,
        "train_batch_size": spec["micro_batch_size"] * accum * world_size,
        "gradient_clipping": spec["grad_clip_norm"],
        "zero_optimization": {"stage": spec["zero_stage"]},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    if spec["precision"] == "bf16":  # the engine's own autocast, fp32 weights and gradients (as dist_train's)
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif spec["precision"] != "fp32":
        raise SystemExit(f"bench.hand_deepspeed: precision {spec['precision']!r} is not written here (fp32, bf16)")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    loader, sampler = train_loader(spec, rank, world_size)
    data = batches(loader, sampler)

    for step in range(1, spec["steps"] + 1):
        for _ in range(accum):
            inputs, targets = next(data)
            inputs, targets = inputs.to(device), targets.to(device)
            if spec.get("fused_loss"):  # the model's chunked loss, summed (dist_train.fused_loss)
                loss = engine(inputs, targets=targets) / targets.numel()
            else:
                loss = loss_fn(engine(inputs), targets)
            engine.backward(loss)
            engine.step()
        if step % spec["log_every"] == 0 and rank == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        clock.tick()

    clock.write(rank)
    if spec["save"]:  # ZeRO-3 partitions the parameters: gathering them is collective
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=spec["zero_stage"] == 3):
            if rank == 0:
                save_weights(engine.module, spec["save"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now()  # skip interpreter teardown: c10d/gloo threads can abort it (see dist_train.cli.exit_with)
