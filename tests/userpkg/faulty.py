"""A model that raises, or hangs, on one rank at a given forward call: for failure-handling tests.

`exit_after_step`: the rank dies right after that call's optimizer step (its gradients all-reduced
already), so the others fail in a collective after the step: the logged loss's all-reduce."""

import os
import time

import torch
import torch.nn as nn


class Faulty(nn.Module):
    def __init__(self, fail_rank: int, fail_call: int, mode: str):
        super().__init__()
        self.linear = nn.Linear(32, 4)
        self.fail_rank, self.fail_call, self.mode, self.calls = fail_rank, fail_call, mode, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if int(os.environ.get("RANK", "0")) == self.fail_rank and self.calls == self.fail_call:
            if self.mode == "raise":
                raise RuntimeError("injected failure")
            if self.mode == "assert":  # the model's own check, not an error torch raises
                raise AssertionError("injected assertion\nsecond line")
            if self.mode == "hang":
                if os.environ.get("FAULTY_HANG_MARK"):  # when the hang began, for the tests' timings
                    open(os.environ["FAULTY_HANG_MARK"], "w").close()
                while True:
                    time.sleep(1)
            if self.mode == "exit" or (
                self.mode == "exit_once" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
            ):
                os._exit(9)
            if self.mode == "exit_after_step":
                from torch.optim.optimizer import register_optimizer_step_post_hook

                register_optimizer_step_post_hook(lambda *args: os._exit(9))
        return self.linear(x)


def faulty(fail_rank: int = 1, fail_call: int = 3, mode: str = "raise") -> nn.Module:
    return Faulty(fail_rank, fail_call, mode)
