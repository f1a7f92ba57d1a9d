"""Process-group lifecycle: detect the launcher, init, teardown, and a few small collectives.

`init_distributed()` returns a frozen `DistContext` that is passed explicitly everywhere
(no global singletons). Supported launchers, detected from the environment:
- torchrun (and `launch/spawn.py`, which sets the same variables): RANK, LOCAL_RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT;
- direct `srun` without torchrun: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, first host of
  SLURM_JOB_NODELIST as master, port derived from the job id;
- nothing: one process (world size 1), the same code path without a process group.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("dist_train")


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None when running without a process group
    launcher: str  # "torchrun", "spawn", "srun" or "single"

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as `gpu[003-005,9],cpu1` -> `gpu003`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return nodelist
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect_launcher(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ if env is None else env)
    if env.get("DIST_TRAIN_LAUNCHER") == "spawn":
        return "spawn"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return "srun"
    return "single"


def _adopt_srun_environment() -> None:
    """Direct srun (one task per GPU): translate SLURM's variables into torchrun's."""
    env = os.environ
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group the launcher set up (or none for a single process)."""
    launcher = detect_launcher()
    if launcher == "srun":
        _adopt_srun_environment()
    if launcher == "single":
        device = torch.device("cuda", 0) if torch.cuda.is_available() and backend != "gloo" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(0, 0, 1, 1, device, None, launcher)

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    backend = pick_backend(backend)
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    init_kwargs = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        init_kwargs["device_id"] = device  # eager NCCL init: bind this rank to its GPU up front
    dist.init_process_group(**init_kwargs)
    return DistContext(rank, local_rank, world_size, local_world_size, device, backend, launcher)


def teardown(ctx: DistContext | None) -> None:
    """Destroy the process group if we made one. Safe to call twice or after a failure."""
    if ctx is not None and ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place sum across ranks (no-op for one process); returns the tensor."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, ctx: DistContext, src: int = 0) -> object:
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def hostname() -> str:
    return socket.gethostname()
