"""Launch one side of a comparison through torchrun and read back its per-step timestamps.

Both sides run under the same launcher (`python -m torch.distributed.run`) with the same
environment, and both write `time.perf_counter()` after every optimizer step (dist_train through
its DIST_TRAIN_STEP_TIMES hook, the hand-written loops through bench.common.StepTimes). On Linux
perf_counter is the system-wide CLOCK_MONOTONIC, so the launcher's own start time and the ranks'
timestamps are on one clock: time to first step = first step's end (slowest rank) - launch.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .workloads import Workload

REPO_ROOT = Path(__file__).resolve().parents[1]
HAND_LOOPS = {"ddp": "bench.hand_ddp", "deepspeed": "bench.hand_deepspeed", "fsdp": "bench.hand_fsdp"}


@dataclass(frozen=True)
class Cell:
    """One row of the table: a workload at a world size under one strategy."""

    workload: Workload
    world_size: int
    strategy: str = "ddp"
    zero_stage: int = 0
    launcher: str = "torchrun"  # or "single": one plain `python -m ...` process (world size 1)

    @property
    def label(self) -> str:
        strategy = f"deepspeed-z{self.zero_stage}" if self.strategy == "deepspeed" else self.strategy
        return f"{self.workload.name} x{self.world_size} {strategy}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(cell: Cell, side: str, run_dir: Path) -> list[str]:
    torchrun = [sys.executable]
    if cell.launcher == "torchrun":
        torchrun += ["-m", "torch.distributed.run", "--nproc_per_node", str(cell.world_size)]
        torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    w = cell.workload
    if side == "dist_train":
        config = run_dir / "config.in.yaml"
        config.write_text(yaml.safe_dump(w.dist_train_config(str(run_dir / "out"), cell.strategy, cell.zero_stage)))
        return [*torchrun, "-m", "dist_train", "--config", str(config)]
    spec = json.dumps(w.spec(cell.strategy, cell.zero_stage))
    return [*torchrun, "-m", HAND_LOOPS[cell.strategy], "--spec", spec]


def run_env(threads: int, times_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
        GLOO_SOCKET_IFNAME=env.get("GLOO_SOCKET_IFNAME", "lo"),
        DIST_TRAIN_STEP_TIMES=str(times_path),
    )
    if threads > 0:  # 0: leave torch's default (bench.gpu)
        env["OMP_NUM_THREADS"] = str(threads)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # same on both sides; DeepSpeed reads it at import
    return env


_stopped_by: list[int] = []  # the signal stop_on_sigterm caught


def stop_on_sigterm() -> None:
    """SIGTERM (`timeout`, a scheduler) ends the benchmark as Ctrl-C does: the run in progress, in its
    own session, is ended with it instead of running on (on a GPU: beside the next command's runs)."""

    def stop(signum, frame):
        _stopped_by.append(signum)  # run_side starts no run after it, should an import swallow the exit
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the benchmark at once
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # as the caller may have left it blocked


def run_side(cell: Cell, side: str, run_dir: Path, threads: int, timeout: float) -> dict:
    """Launch one run and measure it. Returns a record (see `summarise_run`), `ok` False on failure."""
    if _stopped_by:
        raise SystemExit(128 + _stopped_by[0])
    run_dir.mkdir(parents=True, exist_ok=True)
    times_path = run_dir / "step_times"
    cmd = command(cell, side, run_dir)
    env = run_env(threads, times_path)
    with open(run_dir / "log.txt", "w") as log:
        launched = time.perf_counter()
        # own session: a run that times out is ended with its ranks (the hand-written loops have no PDEATHSIG)
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
        except BaseException:  # the benchmark itself stopped (Ctrl-C, SIGTERM: stop_on_sigterm): its run too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finished = time.perf_counter()
    record = {"side": side, "ok": code == 0, "exit": code, "wall_s": finished - launched, "run_dir": str(run_dir)}
    ranks = [times_path.with_name(f"{times_path.name}.rank{r}") for r in range(cell.world_size)]
    if code != 0 or not all(p.is_file() for p in ranks):
        record["ok"] = False
        record["log_tail"] = (run_dir / "log.txt").read_text()[-3000:]
        return record
    record.update(summarise_run([json.loads(p.read_text()) for p in ranks], launched, cell))
    return record


SIDES = ("dist_train", "hand")


def run_pair(cell: Cell, repeat: int, root: Path, threads: int, timeout: float, hand_first: bool = False):
    """Run both sides once, the hand-written side first when `hand_first`.

    Yields each side's record as it finishes (for progress lines); the caller keeps them by side.
    """
    for side in SIDES[::-1] if hand_first else SIDES:
        yield run_side(cell, side, root / f"{repeat}-{side}", threads, timeout)


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def steady_durations(ends: list[float], warmup_steps: int) -> list[float]:
    """Durations of steps warmup_steps+1 .. N from the times at which steps 1 .. N ended."""
    return [b - a for a, b in zip(ends[warmup_steps - 1 : -1], ends[warmup_steps:])]


def synced_windows(ends: list[float], warmup_steps: int, every: int) -> list[float]:
    """Mean step time of each `every`-step window after warm-up, from one step that reads the loss on
    the host (a multiple of `every`) to the next: exact where steps are queued ahead (CUDA)."""
    marks = [ends[step - 1] for step in range(warmup_steps, len(ends) + 1, every)]
    return [(b - a) / every for a, b in zip(marks, marks[1:])]


def summarise_run(rank_records: list[dict], launched: float, cell: Cell) -> dict:
    """Steady-state step time (slowest rank's median step, or its median synchronised window:
    Workload.step_time), samples/s, time to first step, peak RSS per rank."""
    w = cell.workload
    medians, means, windows, cpu = [], [], [], []
    for rec in rank_records:
        durations = steady_durations(rec["steps"], w.warmup_steps)
        medians.append(statistics.median(durations))
        means.append(statistics.fmean(durations))
        windows.append(statistics.median(synced_windows(rec["steps"], w.warmup_steps, w.log_every)))
        cpu.append(statistics.median(steady_durations(rec["cpu"], w.warmup_steps)))
    step_time = max(windows) if w.step_time == "window" else max(medians)  # see Workload.step_time
    samples_per_s = w.global_batch(cell.world_size) / step_time
    out = {
        "step_time_s": step_time,
        "step_time_mean_s": max(means),
        "cpu_per_step_s": max(cpu),  # CPU time of the busiest rank: less sensitive to other load on the machine
        "step_time_p25_s": max(_quantile(steady_durations(rec["steps"], w.warmup_steps), 0.25) for rec in rank_records),
        "samples_per_s": samples_per_s,
        "time_to_first_step_s": max(rec["steps"][0] for rec in rank_records) - launched,
        "launch_to_train_s": max(rec["train_start"] for rec in rank_records) - launched,
        "peak_rss_mb": [round(rec["peak_rss_mb"], 1) for rec in rank_records],
    }
    if w.tokens_per_sample() > 1:
        out["tokens_per_s"] = samples_per_s * w.tokens_per_sample()
    return out


def summarise_cell(pairs: list[tuple[dict, dict]]) -> dict:
    """Medians of each side and of the paired ratios dist_train / hand-written, with their spread."""
    ok = [(a, b) for a, b in pairs if a["ok"] and b["ok"]]
    if not ok:
        return {"ok": False}

    def ratio_stats(key: str, pick=lambda v: v) -> dict:
        ratios = [pick(a[key]) / pick(b[key]) for a, b in ok]
        return {
            "dist_train": statistics.median(pick(a[key]) for a, _ in ok),
            "hand": statistics.median(pick(b[key]) for _, b in ok),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }

    hand_steps = [b["step_time_s"] for _, b in ok]
    return {
        "ok": True,
        "pairs": len(ok),
        "step_time_s": ratio_stats("step_time_s"),
        "samples_per_s": ratio_stats("samples_per_s"),
        "cpu_per_step_s": ratio_stats("cpu_per_step_s"),
        "time_to_first_step_s": ratio_stats("time_to_first_step_s"),
        "peak_rss_mb": ratio_stats("peak_rss_mb", max),  # the largest rank
        # run-to-run noise of the reference itself: spread of its median step time across repeats
        "hand_step_spread": (max(hand_steps) - min(hand_steps)) / statistics.median(hand_steps),
    }


def pooled_step_ratios(cells: list[dict], world_size: int = 2, resamples: int = 2000) -> dict:
    """Per strategy and over all, at `world_size`: the geometric mean of every paired step-time ratio
    dist_train / hand-written, with a 95% bootstrap interval (seeded). The bootstrap is stratified:
    each cell's pairs are resampled within the cell, so differences between cells are not taken
    for noise between pairs.
    """
    groups: dict[str, list[list[float]]] = {}
    for cell in cells:
        if cell["world_size"] != world_size:
            continue
        logs = [math.log(a["step_time_s"] / b["step_time_s"]) for a, b in cell["runs"] if a["ok"] and b["ok"]]
        if logs:
            groups.setdefault(cell["strategy"], []).append(logs)
            groups.setdefault("all", []).append(logs)
    rng = random.Random(0)
    out = {}
    for group, strata in sorted(groups.items(), key=lambda item: item[0] == "all"):  # "all" last
        values = [v for stratum in strata for v in stratum]
        means = sorted(
            statistics.fmean([v for stratum in strata for v in rng.choices(stratum, k=len(stratum))])
            for _ in range(resamples)
        )
        out[group] = {
            "pairs": len(values),
            "ratio": math.exp(statistics.fmean(values)),
            "low": math.exp(means[int(0.025 * resamples)]),
            "high": math.exp(means[int(0.975 * resamples) - 1]),
        }
    return out
