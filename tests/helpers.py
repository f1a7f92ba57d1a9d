"""Shared helpers for multi-rank tests: spawn gloo ranks on a free loopback port.

`run_ranks(fn, world_size, *args)` runs `fn(rank, world_size, *args)` in `world_size`
fresh processes that have joined one gloo process group, and returns the list of
whatever each rank returned (rank order). A rank that raises fails the call with that
rank's traceback, and the other ranks are torn down.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        payload = ("ok", result)
    except BaseException:  # noqa: BLE001 - shipped back to the parent test verbatim
        payload = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, tmp_dir: str | os.PathLike | None = None
) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return each rank's result."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=tmp_dir) as out_dir:
        mp.start_processes(
            _rank_entry,
            args=(world_size, free_port(), fn, args, out_dir),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results


def run_cli(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, cwd: str | os.PathLike | None = None
) -> subprocess.CompletedProcess:
    """Run a command (e.g. [sys.executable, '-m', 'dist_train', ...]) and capture its output."""
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    full_env.update(env or {})
    return subprocess.run(args, env=full_env, cwd=cwd or REPO_ROOT, capture_output=True, text=True, timeout=timeout)


PYTHON = sys.executable
