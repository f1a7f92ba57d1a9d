"""Process-group lifecycle: detect the launcher, init, teardown, and `all_reduce_sum`.

`init_distributed()` returns a frozen `DistContext` that is passed explicitly everywhere
(no global singletons). Supported launchers, detected from the environment:
- torchrun (and `launch/spawn.py`, which sets the same variables): RANK, LOCAL_RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT;
- direct `srun` without torchrun: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, first host of
  SLURM_JOB_NODELIST as master, port derived from the job id;
- nothing: one process (world size 1), the same code path without a process group.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("dist_train")


class JoinError(RuntimeError):
    """The ranks did not all join the process group in time: a failure (status 1), said in one line."""


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
    """First host of a SLURM hostlist, the one `scontrol show hostnames` lists first.

    `gpu[003-005,9],cpu1` -> `gpu003`; `rack[1-2]-n[3-4]` -> `rack1-n3` (each bracket contributes
    its first value, zero padding kept); a plain `host1,host2` -> `host1`.
    """
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry ends at a comma outside brackets
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            end = i
            break
    first_entry = nodelist[:end].strip()
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0].strip(), first_entry)


def detect_launcher(env: dict[str, str] | None = None) -> str:
    """The launcher that started this process: "spawn", "torchrun", "srun" or "single".

    torchrun's variables win over SLURM's (torchrun inside an srun task). "srun" means a job step
    (SLURM_STEP_ID; the batch script itself has none) of more than one task; an srun step of one
    task, or a batch script calling python directly, is a single process.
    """
    env = os.environ if env is None else env
    if env.get("DIST_TRAIN_LAUNCHER") == "spawn":
        return "spawn"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    step_tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(step_tasks) > 1:
        return "srun"
    return "single"


def _adopt_srun_environment() -> None:
    """Direct srun (one task per rank): translate the job step's SLURM variables into torchrun's.

    RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE describe the step (LOCAL_WORLD_SIZE: this
    node's entry of SLURM_STEP_TASKS_PER_NODE, e.g. `2(x3),1`). MASTER_ADDR is the step's first node
    (rank 0 runs there); MASTER_PORT is 15000 + (16 x job id + step id) mod 17000: below Linux's
    ephemeral ports, the same for every task and for a requeued job, different for concurrent steps.
    MASTER_ADDR/MASTER_PORT exported by the user are kept.
    """
    env = os.environ
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]
    tasks_per_node: list[int] = []
    for part in (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "").split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match:
            tasks_per_node += [int(match.group(1))] * int(match.group(2) or 1)
    node_index = int(env.get("SLURM_NODEID", "0"))
    if tasks_per_node:
        env["LOCAL_WORLD_SIZE"] = str(tasks_per_node[min(node_index, len(tasks_per_node) - 1)])
    else:
        env["LOCAL_WORLD_SIZE"] = (env.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    env.setdefault("MASTER_ADDR", first_slurm_host(nodelist) or "127.0.0.1")
    job_id = int(env.get("SLURM_JOB_ID") or 0)
    step_id = int(env["SLURM_STEP_ID"]) if env.get("SLURM_STEP_ID", "").isdigit() else 0
    env.setdefault("MASTER_PORT", str(15000 + (16 * job_id + step_id) % 17000))


def rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The MASTER_ADDR:MASTER_PORT store, namespaced by the torchrun restart attempt.

    torchrun's static rendezvous keeps one store across `--max-restarts` attempts, so restarted
    workers could read the previous attempt's gloo/NCCL addresses and fail to connect; a prefix
    per attempt gives every attempt fresh keys. Under torchrun (and spawn.py) the launcher hosts
    the store and every rank is a client; otherwise (direct srun, or a c10d rendezvous that does
    not share its store: a fresh store per round, hosted by rank 0) rank 0 hosts it, and the prefix
    is left out: the restart count is each node's own (a node whose ranks did not fail restarts
    them without counting), so ranks of different nodes would wait under different prefixes.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    hosts_store = not agent_hosts_store and rank == 0
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world_size,
            is_master=hosts_store,
            timeout=timeout,
            multi_tenant=True,
        )
    except dist.DistNetworkError as err:
        if not (hosts_store and "EADDRINUSE" in str(err)):
            raise
        from .errors import UserError

        raise UserError(
            f"MASTER_PORT={os.environ['MASTER_PORT']} is in use on this machine (another run or torchrun "
            "listens there), and rank 0 hosts the rendezvous store on it: export a free MASTER_PORT on every rank"
        ) from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if agent_hosts_store else "0"
    return dist.PrefixStore(f"dist_train/attempt-{attempt}", store)


def check_rank_environment(env: dict[str, str] | None = None) -> None:
    """RANK and WORLD_SIZE set by hand (no launcher) need the rendezvous address as torchrun sets it:
    a missing one is a UserError (one line, status 2), not a KeyError traceback or a wait until timeout."""
    from .errors import UserError

    env = os.environ if env is None else env
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise UserError(
            f"RANK and WORLD_SIZE are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "export MASTER_ADDR (rank 0's host) and MASTER_PORT (a free port there) on every rank, "
            "or start the ranks with torchrun or launch/spawn.py"
        )
    if not env["MASTER_PORT"].isdigit() or not 0 < int(env["MASTER_PORT"]) < 65536:
        raise UserError(f"MASTER_PORT must be a TCP port number (1-65535), got {env['MASTER_PORT']!r}")
    rank, world_size = env["RANK"], env["WORLD_SIZE"]
    if not (rank.isdigit() and world_size.isdigit() and int(rank) < int(world_size)):
        raise UserError(f"RANK={rank} WORLD_SIZE={world_size}: RANK must be one of 0 to WORLD_SIZE - 1")
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        if not env.get(name, "0").isdigit():
            raise UserError(f"{name} must be a non-negative integer, got {env[name]!r}")


def check_single_environment(env: dict[str, str] | None = None) -> None:
    """A RANK without WORLD_SIZE, or a WORLD_SIZE above 1 without RANK, exported by hand: a UserError.

    Without both there is no launcher, and the rank of a bigger job would train alone as a one-process
    run, into the job's output folder, while its peers wait for it."""
    from .errors import UserError

    env = os.environ if env is None else env
    for present, absent, alone in (("RANK", "WORLD_SIZE", "0"), ("WORLD_SIZE", "RANK", "1")):
        if present in env and absent not in env and env[present] != alone:
            raise UserError(
                f"{present}={env[present]} is set but {absent} is not: export RANK, WORLD_SIZE, MASTER_ADDR and "
                f"MASTER_PORT on every rank, or start the ranks with torchrun or launch/spawn.py (unset {present} "
                "for a one-process run)"
            )


def pick_backend(requested: str) -> str:
    if requested == "nccl" and not torch.cuda.is_available():
        from .errors import UserError, on_every_rank

        raise on_every_rank(UserError("dist.backend=nccl needs CUDA GPUs and this machine has none: use gloo or auto"))
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    backend: str = "auto", timeout_s: float = 600.0, timeout_key: str = "dist.timeout_s"
) -> DistContext:
    """Join the process group the launcher set up (or none for a single process). JoinError, naming
    `timeout_key` (the setting that gave `timeout_s`), when not every rank joined in time."""
    launcher = detect_launcher()
    if launcher == "srun":
        _adopt_srun_environment()
    pick_backend(backend)  # nccl without CUDA: one line, before anything waits for a peer
    if launcher == "single":
        check_single_environment()
        device = torch.device("cuda", 0) if torch.cuda.is_available() and backend != "gloo" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(0, 0, 1, 1, device, None, launcher)

    check_rank_environment()
    # torchrun's and spawn.py's ranks die with their launcher; a rank started by hand (RANK... exported,
    # `nohup python -m dist_train &`) has a shell for a parent, and outlives it as one process does
    if launcher == "spawn" or "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    backend = pick_backend(backend)
    if backend == "nccl":
        # `% device_count`: srun --gpus-per-task shows each task only its own GPU
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    init_kwargs = {"backend": backend, "timeout": timeout, "rank": rank, "world_size": world_size}
    if device.type == "cuda":
        init_kwargs["device_id"] = device  # eager NCCL init: bind this rank to its GPU up front
    try:
        init_kwargs["store"] = _store_within_deadline(rank, world_size, timeout, timeout_key)
        dist.init_process_group(**init_kwargs)
    except dist.DistNetworkError as err:  # a client that found no store there: its host (rank 0 of a direct
        # srun or of ranks started by hand) never came up, or another program holds the port
        address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise JoinError(
            f"rank {rank} of {world_size}: could not join the rendezvous store at {address} (MASTER_ADDR:MASTER_PORT) "
            f"within {timeout_key}={timeout_s:g} s ({str(err).strip().splitlines()[0]}): the rank that hosts it "
            "(rank 0, unless a launcher does) failed before hosting it or never started, or another program holds "
            "that port; look at the other ranks' and nodes' output"
        ) from None
    except dist.DistStoreError as err:  # a rank (another node's, say) failed before joining: said plainly
        raise JoinError(
            f"rank {rank} of {world_size}: not every rank joined the process group within {timeout_key}="
            f"{timeout_s:g} s ({str(err).strip().splitlines()[0]}): a rank on this or another node failed "
            "before joining, or never started; look at the other ranks' and nodes' output"
        ) from None
    return DistContext(rank, local_rank, world_size, local_world_size, device, backend, launcher)


STORE_GRACE_S = 10.0  # past dist.timeout_s, the store's own timeout: then the connection is stuck, not slow


def _store_within_deadline(rank: int, world_size: int, timeout: datetime.timedelta, timeout_key: str) -> dist.Store:
    """`rendezvous_store`, or exit 1 with one line once the timeout (`timeout_key`) + STORE_GRACE_S have passed.

    A client whose MASTER_PORT another program holds (rank 0 then stops: the port is in use) connects to
    it, and torch's TCPStore client waits for its answer without a timeout: the rank hung for good
    (direct srun derives the port from the job id, so a port taken on the first node hung the job)."""

    def give_up() -> None:
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        sys.stderr.write(
            f"dist_train: rank {rank} of {world_size}: the rendezvous store at {address} (MASTER_ADDR:MASTER_PORT) "
            f"did not answer within {timeout_key}={timeout.total_seconds():g} s + {STORE_GRACE_S:g} s: another "
            "program may listen on that port; export a free MASTER_PORT on every rank\n"
        )
        sys.stderr.flush()
        os._exit(1)

    deadline = threading.Timer(timeout.total_seconds() + STORE_GRACE_S, give_up)
    deadline.daemon = True
    deadline.start()
    try:
        return rendezvous_store(rank, world_size, timeout)
    finally:
        deadline.cancel()


def die_with_parent(parent_pid: int | None = None) -> None:
    """Linux: get SIGKILL when the parent process dies (kill -9 of torchrun or spawn.py, or of a
    rank whose DataLoader workers this runs in).

    Otherwise orphaned ranks would train on and write into the same output folder as the job that
    replaces them, and orphaned loader workers would wait forever. `parent_pid` closes the race of
    a parent that died while this process was still starting.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1 or (parent_pid is not None and os.getppid() != parent_pid):  # parent already gone
        os._exit(1)


def teardown(ctx: DistContext | None) -> None:
    """Destroy the process group if we made one. Safe to call twice or after a failure."""
    if ctx is not None and ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place sum across ranks (no-op for one process); returns the tensor."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
