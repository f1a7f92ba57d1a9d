"""Shared helpers for multi-rank tests: start gloo ranks on a free loopback port.

`run_ranks(fn, world_size, *args)` runs `fn(rank, world_size, *args)` in `world_size`
forked processes that have joined one gloo process group, and returns the list of
whatever each rank returned (rank order). A rank that raises fails the call with that
rank's traceback, and the other ranks are torn down.

The ranks are forked from a multiprocessing fork server that imported torch (and torch._dynamo,
which the first optimizer imports) once for the whole pytest process: a spawned rank spent about
5 s of CPU importing them, which was a sixth of the suite's CPU time on two cores. Each rank
takes os.environ as it is when run_ranks is called, not as the fork server found it.

`launch(config, tmp_path, overrides, nproc, launcher)` runs dist_train's command line through a real
launcher ("single": `python -m dist_train`, "spawn": launch/spawn.py, "torchrun"), or, with
launcher="forked", runs the same `dist_train.cli.main` in ranks forked from that fork server (which
has imported deepspeed too), through launch/spawn.py's own rank entry and rendezvous store: for the
tests of what a run does, not of how it is started. A forked
rank reads no import-time setting from the environment the test passes (TORCHINDUCTOR_*, OpenMP's
variables: the fork server read them before the test ran), so the tests that set one launch for real,
as do the tests of the launchers, signals, start-up and imports.
"""

from __future__ import annotations

import functools
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[1]


# Ports handed out by free_port: below Linux's ephemeral range, so that no connection's source port
# (gloo opens many) takes one between free_port and the bind that uses it, and below 15000, where the
# SLURM templates' ports start. Each pytest-xdist worker draws from its own slice.
PORT_RANGE = (10000, 15000)


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    low, high = PORT_RANGE
    span = (high - low) // max(workers, 1)
    first = low + span * (int(worker) if worker.isdigit() else 0)
    candidates = random.sample(range(first, first + span), min(64, span)) if _ephemeral_start() >= high else []
    for port in [*candidates, 0]:  # 0: the kernel's choice, when no port of the slice is free
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise AssertionError("no free TCP port on 127.0.0.1")


# What the fork server imports before it forks any rank: what every rank would import by itself.
FORK_SERVER_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "dist_train.trainer", "deepspeed"]


def _fork_server():
    """The multiprocessing context whose fork server has imported FORK_SERVER_PRELOAD (started once)."""
    from multiprocessing import forkserver

    context = mp.get_context("forkserver")
    context.set_forkserver_preload(FORK_SERVER_PRELOAD)
    saved = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"  # the fork server's own environment, for its import of deepspeed
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["DS_ACCELERATOR"]
        else:
            os.environ["DS_ACCELERATOR"] = saved
    return context


def _rank_entry(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str, environ: dict[str, str]
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(environ)
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
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # c10d threads can abort at interpreter teardown (see dist_train.cli.exit_with)


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, tmp_dir: str | os.PathLike | None = None
) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return each rank's result."""
    import tempfile

    _fork_server()
    with tempfile.TemporaryDirectory(dir=tmp_dir) as out_dir:
        mp.start_processes(
            _rank_entry,
            args=(world_size, free_port(), fn, args, out_dir, dict(os.environ)),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results


@functools.cache
def _spawn_launcher():
    """launch/spawn.py, imported as a module (it is a script beside the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dist_train_spawn_launcher", REPO_ROOT / "launch" / "spawn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _forked_cli_rank(rank: int, world_size: int, port: int, argv: list[str], environ: dict[str, str], out_dir: str):
    """One rank of `launch(..., launcher="forked")`: `python -m dist_train ARGV` in this forked process,
    through launch/spawn.py's own rank entry when there are several."""
    import torch

    os.environ.clear()
    os.environ.update(environ)
    sys.path[:0] = [path for path in environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    sys.argv = ["dist_train", *argv]
    os.chdir(REPO_ROOT)  # as run_cli's commands (the fork server kept the folder it started in)
    for fd, name in ((1, "out"), (2, "err")):
        with open(os.path.join(out_dir, f"rank{rank}.{name}"), "w") as file:
            os.dup2(file.fileno(), fd)
    torch.set_num_threads(int(environ.get("OMP_NUM_THREADS") or 1))  # the fork server's OpenMP read no variable
    if world_size > 1:
        _spawn_launcher()._rank_main(rank, world_size, port, argv)  # its environment, main(argv), os._exit
    from dist_train.cli import exit_with, main

    exit_with(main(argv))


def run_forked(
    argv: list[str], nproc: int, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m dist_train ARGV` on `nproc` ranks forked from the fork server (torch, torch._dynamo and
    deepspeed imported once per pytest process), as launch/spawn.py runs them: its rank entry, and its
    rendezvous store in this process. The exit status is the first failing rank's; stdout and stderr
    are the ranks' in rank order."""
    import tempfile

    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), environ.get("PYTHONPATH", "")])
    context = _fork_server()
    store, port = _spawn_launcher().loopback_store(nproc) if nproc > 1 else (None, 0)
    with tempfile.TemporaryDirectory() as out_dir:
        ranks = [
            context.Process(target=_forked_cli_rank, args=(rank, nproc, port, list(argv), environ, out_dir))
            for rank in range(nproc)
        ]
        for rank in ranks:
            rank.start()
        deadline = time.monotonic() + timeout
        for rank in ranks:
            rank.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank in ranks if rank.is_alive()]
        for rank in hung:
            rank.kill()
            rank.join()
        del store  # the ranks are gone
        if hung:
            raise subprocess.TimeoutExpired(["dist_train", *argv], timeout)
        codes = [rank.exitcode for rank in ranks]
        outputs = {
            name: "".join(path.read_text() for path in sorted(Path(out_dir).glob(f"rank*.{name}")))
            for name in ("out", "err")
        }
    failed = [code for code in codes if code != 0]
    code = (failed[0] if failed[0] > 0 else 128 - failed[0]) if failed else 0
    return subprocess.CompletedProcess(["dist_train", *argv], code, outputs["out"], outputs["err"])


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


def write_config(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def launch(
    config: dict | Path,
    tmp_path: Path,
    overrides: list[str] = (),
    nproc: int = 1,
    launcher: str = "spawn",
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run dist_train on `nproc` ranks through `launcher` ("single", "spawn", "torchrun" or "forked")."""
    if isinstance(config, dict):
        config = write_config(tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml", config)
    args = ["--config", str(config), *overrides]
    if launcher == "single":
        cmd = [PYTHON, "-m", "dist_train", *args]
    elif launcher == "forked":
        return run_forked(args, nproc, env=env, timeout=timeout)
    elif launcher == "spawn":
        cmd = [PYTHON, str(REPO_ROOT / "launch" / "spawn.py"), "--nproc_per_node", str(nproc), *args]
    else:
        cmd = [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "dist_train",
            *args,
        ]
    return run_cli(cmd, env=env, timeout=timeout)


def load_weights(run_dir: Path) -> dict:
    from dist_train.safetensors_io import load_file

    return load_file(Path(run_dir) / "model.safetensors")


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def read_rows(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def ctx_from_env():
    """The DistContext of a rank started by run_ranks (the process group already exists)."""
    import torch

    from dist_train.distributed import DistContext

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return DistContext(rank, rank, world, world, torch.device("cpu"), "gloo", "spawn")


def tiny_lm_config(output_dir: Path, **sections) -> dict:
    """A small transformer_lm config that runs in a couple of seconds; sections override keys."""
    config = {
        "run": {"output_dir": str(output_dir), "seed": 0},
        "model": {
            "name": "transformer_lm",
            "vocab_size": 64,
            "seq_len": 16,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
        },
        "data": {"name": "synthetic_tokens", "vocab_size": 64, "seq_len": 16, "num_samples": 512, "eval_samples": 50},
        "train": {"max_steps": 10, "micro_batch_size": 4, "grad_accum_steps": 2, "lr": 1e-3, "grad_clip_norm": 0.5},
        "checkpoint": {"every_steps": None},
        "log": {"every_steps": 1, "plot": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def slow_lm_config(output_dir: Path, delay: float, **sections) -> dict:
    """`tiny_lm_config` for a long run (400 steps, no periodic checkpoint) whose items take `delay`
    seconds each: a run to signal, stop or kill while it trains."""
    config = tiny_lm_config(output_dir, train={"max_steps": 400}, checkpoint={"every_steps": 1000}, **sections)
    config["data"] = {**config["data"], "name": "userpkg.slow:slow_tokens", "delay": delay, "num_samples": 4096}
    return config


def start(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """Start a launcher in the background (tests/ importable, one thread per rank); stderr is piped."""
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen_kwargs)


def wait_for_step(proc: subprocess.Popen, output_dir: Path, step: int, timeout: float = 60) -> None:
    """Until `output_dir`'s metrics.jsonl has a row of `step` (the run must still be going)."""
    metrics, deadline = output_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and f'"step": {step},' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.1)


def as_plain_user() -> list[str]:
    """A command prefix that makes file permissions apply (root ignores them; setpriv drops that)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        import pytest

        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
