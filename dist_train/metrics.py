"""What a logged row holds and where it goes: the loss window and throughput between logging steps
(every rank), then rank 0's output: metrics.jsonl rows, a tqdm bar on a terminal or plain lines
otherwise, TensorBoard."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch

from .distributed import DistContext, all_reduce_sum

log = logging.getLogger("dist_train")


def tokens_per_sample(sample: torch.Tensor) -> int:
    """Token ids in one input sample (tokens/s, MFU): the elements of an int32/int64 input; 1 for any
    other input (floats, and uint8/bool pixels or masks are not tokens)."""
    return sample.numel() if sample.dtype in (torch.int32, torch.int64) else 1


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux ru_maxrss is in KiB)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover - non-Unix
        return psutil.Process().memory_info().rss / 2**20


STEP_TIMES_ENV = "DIST_TRAIN_STEP_TIMES"


def step_times_hook() -> list | None:
    """Benchmark hook, off unless DIST_TRAIN_STEP_TIMES=PATH is set (read once per run).

    Returns a list that starts with `time.perf_counter()` at the call (train() entry) and to which
    the loop appends `(perf_counter, process_time)` after every optimizer step; `write_step_times`
    dumps it when the loop ends. Unset: None, and the loop pays one `is not None` test per step.
    perf_counter is the system-wide CLOCK_MONOTONIC on Linux, so a launcher can compare it with its
    own start time; process_time (this process's CPU time) is robust to other load on the machine.
    """
    return [time.perf_counter()] if os.environ.get(STEP_TIMES_ENV) else None


def write_step_times(times: list | None, rank: int) -> None:
    """Write PATH.rank<R>: {"rank", "train_start", "steps": [wall], "cpu": [CPU s], "peak_rss_mb"}."""
    if times is None:
        return
    steps = times[1:]
    record = {
        "rank": rank,
        "train_start": times[0],
        "steps": [wall for wall, _ in steps],
        "cpu": [cpu for _, cpu in steps],
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(f"{os.environ[STEP_TIMES_ENV]}.rank{rank}").write_text(json.dumps(record))


def _clean(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def _ends_mid_row(path: Path) -> bool:
    """Whether the file's last line lacks its newline: the next row appended would be glued to it."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:  # none yet, or empty
        return False


class MetricsLogger:
    """Writes rows on rank 0; every method is a no-op on the other ranks."""

    def __init__(
        self, output_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: str, tensorboard: bool
    ):
        self.enabled = enabled
        self.file = None
        self.bar = None
        self.tb = None
        self.tb_purge_step = None  # TensorBoard on: opened by the first row or text (`tensorboard()`)
        if tensorboard:  # checked on every rank, so a missing package stops all of them alike (exit 2)
            from .imports import require

            require("tensorboard", "tb", "log.tensorboard")
        if not enabled:
            return
        path = output_dir / "metrics.jsonl"
        torn = _ends_mid_row(path)
        self.file = open(path, "a", buffering=1)  # line-buffered: a crash loses no row
        if torn:  # a row a crash cut short (a full disk, a lost node) stays one malformed line of its own
            self.file.write("\n")
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
        if tensorboard:
            # A resumed run re-logs the steps after its checkpoint, and a run started again before its
            # first checkpoint every step: purge_step drops the earlier attempt's events from there
            # on, so each tag keeps one value per step.
            self.tb_dir, self.tb_purge_step = output_dir / "tb", start_step + 1
            self.tb_dir.mkdir(exist_ok=True)  # a file in its way fails here, at start-up, as the writer did

    def tensorboard(self):
        """The SummaryWriter, opened at the first row or text: its purge (written when it opens) waits
        until the config ran its first step, so a config refused with status 2 hides no earlier events."""
        if self.tb is None and self.tb_purge_step is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.tb_dir), purge_step=self.tb_purge_step, flush_secs=10)
        return self.tb

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        if self.tensorboard() is not None and "step" in row:  # tags are the metrics.jsonl keys
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, row["step"])

    def emit(self, row: dict) -> None:
        """Write the row to metrics.jsonl (and TensorBoard) and show it on the console."""
        self.write(row)
        self.console(row)

    def text(self, tag: str, text: str) -> None:
        if self.enabled and self.tensorboard() is not None:
            self.tb.add_text(tag, text)

    def console(self, row: dict) -> None:
        if not self.enabled:
            return
        if "loss" in row:
            short = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "samples/s": f"{row['samples_per_s']:.0f}"}
            if "tokens_per_s" in row:
                short["tokens/s"] = f"{row['tokens_per_s']:.0f}"
            if "step_time_s" in row:
                short["step"] = f"{row['step_time_s'] * 1e3:.1f}ms"
                short["data wait"] = f"{row['data_wait_frac']:.0%}"
            if "mfu" in row:
                short["mfu"] = f"{row['mfu']:.1%}"
        else:
            short = {k: f"{v:.4f}" for k, v in row.items() if k.startswith("eval_") and isinstance(v, float)}
        if self.bar is not None:
            self.bar.n = row["step"]
            self.bar.set_postfix(short, refresh=True)
        else:
            log.info("step %d | %s", row["step"], " | ".join(f"{k} {v}" for k, v in short.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


class Throughput:
    """Wall-clock window between logging steps (the logging step's host read is the sync point).

    Evaluation and checkpoint time is left out of the window (`paused()`), so `step_time_s` and the
    rates describe training steps; `data_wait_frac` is the share of that time spent blocked on the
    DataLoader. `mfu_per_token` (see flops.py) turns tokens/s into model FLOPs utilisation (CUDA only).
    """

    def __init__(self, mfu_per_token: float | None = None, device: torch.device | None = None) -> None:
        self.device = device
        self.start = time.perf_counter()
        self.steps = 0
        self.data_wait = 0.0
        self.tokens = 0  # this rank's token ids in the window (host ints: every item's own length)
        self.mfu_per_token = mfu_per_token

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside (evaluation, checkpoints) out of the current window. On CUDA the
        training work still queued finishes first, inside the window (a sync on these steps only)."""
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def data_wait_frac(self) -> float:
        """This rank's share of the window so far spent blocked on the DataLoader."""
        return self.data_wait / max(time.perf_counter() - self.start, 1e-9)

    def rates(self, samples_per_step: int, tokens: float | None = None, data_wait_frac: float | None = None) -> dict:
        """The window's row; `tokens`: the token ids of its steps' inputs, all ranks (None: not tokens);
        `data_wait_frac`: the ranks' largest (None: this rank's)."""
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        row = {
            "samples_per_s": self.steps * samples_per_step / elapsed,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait_frac": self.data_wait / elapsed if data_wait_frac is None else data_wait_frac,
        }
        if tokens is not None:
            row["tokens_per_s"] = tokens / elapsed
            if self.mfu_per_token:
                row["mfu"] = row["tokens_per_s"] * self.mfu_per_token
        self.start, self.steps, self.data_wait, self.tokens = now, 0, 0.0, 0
        return row


class LossWindow:
    """What the loop gathers between logging steps: each micro-batch's loss sum, the loss normaliser,
    each step's skipped flag. Gathering runs no device op (it keeps the step's own tensors); the
    logging step reduces them with its one host read.

    The loss sum is added left to right in float64, and a checkpoint stores the partial sum: a
    resumed run continues the very same sum and logs the same losses as an uninterrupted one. A long
    logging interval folds its first COMPACT_AT entries into one (the same sum, continued), so the
    window holds a bounded number of tensors whatever `log.every_steps` is.
    """

    COMPACT_AT = 1024  # micro-batch losses held before folding

    def __init__(
        self, ctx: DistContext, limit: int, loss_sum=None, count: float = 0.0, skipped: int = 0, streak=(0, 0)
    ):
        self.ctx = ctx
        self.limit = limit  # skipped steps in a row that end the run (checked by the loop)
        self.skipped = skipped  # skipped steps in the run so far (read on logging steps)
        # skipped steps in a row now, and the most in a row since the last check (up to the last logging step)
        self.streak, self.longest_streak = streak
        self.data_wait_frac = 0.0  # the ranks' largest, of the window the last read ended
        self._reset([] if loss_sum is None else [loss_sum], count)

    def _reset(self, losses: list, count) -> None:
        self.losses, self.counts, self.flags, self.grad_norm = losses, [count], [], None

    def add(self, losses: list[torch.Tensor], count, grad_norm: torch.Tensor, nonfinite: torch.Tensor) -> None:
        self.losses += losses
        self.counts.append(count)
        self.flags.append(nonfinite.reshape(1))
        self.grad_norm = grad_norm
        if len(self.losses) >= self.COMPACT_AT:
            self.losses, self.counts, self.flags = [self.loss_sum()], [sum(self.counts)], [torch.cat(self.flags)]

    def loss_sum(self) -> torch.Tensor:
        """This rank's loss sum over the window (float64, on the device)."""
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for loss in self.losses:
            total = total + loss
        return total

    def count(self) -> torch.Tensor:
        return torch.as_tensor(sum(self.counts), dtype=torch.float64, device=self.ctx.device)

    def read(self, tokens: int = 0, data_wait_frac: float = 0.0) -> tuple[float, float, float]:
        """(global mean loss, last grad norm, `tokens` summed over the ranks) of the window, in one
        host read (collective: the loss sum, this rank's `tokens` and its `data_wait_frac`, in its own
        slot, are all-reduced together); updates the skipped-step counts and `data_wait_frac` (the
        largest of the ranks': one rank's slow data holds every rank back) and starts the next window."""
        host = [float(tokens)] + [0.0] * self.ctx.world_size
        host[1 + self.ctx.rank] = data_wait_frac
        host = torch.tensor(host, dtype=torch.float64, device=self.ctx.device)
        sums = all_reduce_sum(torch.cat([self.loss_sum().reshape(1), host]), self.ctx)
        tail = torch.cat([torch.stack([self.count(), self.grad_norm.double()]), torch.cat(self.flags).double()])
        loss_sum, tokens, *rest = torch.cat([sums, tail]).tolist()
        waits, (count, grad_norm, *flags) = rest[: self.ctx.world_size], rest[self.ctx.world_size :]
        self.data_wait_frac = max(waits)
        self.skipped, self.streak, self.longest_streak = self._counted(flags)
        self._reset([], 0.0)
        return loss_sum / max(count, 1.0), grad_norm, tokens

    def _counted(self, flags: list) -> tuple[int, int, int]:
        """(skipped steps, in a row now, most in a row) once the window's step flags are counted in."""
        skipped, streak, longest = self.skipped, self.streak, self.longest_streak
        for flag in flags:
            streak = streak + 1 if flag else 0
            longest, skipped = max(longest, streak), skipped + bool(flag)
        return skipped, streak, longest

    def checkpoint_values(self) -> tuple[torch.Tensor, float, int, list]:
        """(this rank's loss sum, count, skipped steps, [in a row now, most in a row]) for a checkpoint
        (reads the open window's flags on the host): a resumed run stops after as many non-finite
        steps in a row as the uninterrupted one."""
        flags = torch.cat(self.flags).tolist() if self.flags else []
        skipped, streak, longest = self._counted(flags)
        return self.loss_sum(), float(self.count().item()), skipped, [streak, longest]
