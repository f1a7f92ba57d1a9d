"""A dataset that takes a little time per item, so a test can interrupt a run mid-training; a model
that runs a child process when it is first evaluated, as torch.compile runs its compiler."""

import os
import subprocess
import time

import torch
from torch.utils.data import Dataset

from dist_train.data.synthetic import synthetic_tokens


class Slow(Dataset):
    def __init__(self, inner: Dataset, delay: float):
        self.inner, self.delay = inner, delay

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        time.sleep(self.delay)
        return self.inner[index]


def slow_tokens(split: str, delay: float = 0.005, slow_rank: int | None = None, **kwargs) -> Dataset | None:
    """`slow_rank`: only that rank's train items take `delay` s (the others' none)."""
    inner = synthetic_tokens(split, **kwargs)
    if slow_rank is not None and int(os.environ.get("RANK", "0")) != slow_rank:
        delay = 0.0
    return None if inner is None else (Slow(inner, delay) if split == "train" else inner)


def slow_worker_start_tokens(split: str, worker_start_delay: float = 2.0, **kwargs) -> Dataset | None:
    """synthetic_tokens whose loader workers take `worker_start_delay` s to start, right after torch
    installs its worker signal handlers (SIGTERM from anyone but the rank: die) and before
    `worker_init_fn`: a signal to the process group lands in that window."""
    from torch.utils.data._utils import signal_handling

    original = getattr(signal_handling._set_worker_signal_handlers, "original", None)
    original = original or signal_handling._set_worker_signal_handlers

    def slow_start(*args):
        original(*args)
        time.sleep(worker_start_delay)

    slow_start.original = original
    signal_handling._set_worker_signal_handlers = slow_start  # forked workers inherit it
    return synthetic_tokens(split, **kwargs)


class CompilingAtEval(torch.nn.Module):
    """A linear model whose first forward in eval mode runs a child process for `seconds`, and fails
    when that process does not end well, as torch.compile's recompilation for evaluation runs the C++
    compiler (inductor raises CppCompileError when g++ dies)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.linear = torch.nn.Linear(32, 4)
        self.seconds, self.compiled = seconds, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not self.compiled:
            self.compiled = True
            subprocess.run(["sleep", str(self.seconds)], check=True)
        return self.linear(x)


def compiling_at_eval(seconds: float = 3.0) -> torch.nn.Module:
    return CompilingAtEval(seconds)
